"""captum_vit: class-specific explanations of timm Vision Transformers for Captum.

Methods (Captum ``Attribution`` subclasses with ``attribute(inputs, target=...)``):

- :class:`LayerReciproCAM`: ViT-ReciproCAM, gradient-free token masking.
- :class:`AttentionGuidedGradCAM`: AGCAM, sigmoid-guided attention gradients.
- :class:`AttentionRollout` and :class:`GradientRollout`: attention baselines.

Metrics live in :mod:`captum_vit.metrics`. Importing this package does not
import matplotlib.
"""

from .agcam import AttentionGuidedGradCAM
from .reciprocam import LayerReciproCAM, reciprocal_masks
from .rollout import AttentionRollout, GradientRollout

__all__ = [
    "AttentionGuidedGradCAM",
    "AttentionRollout",
    "GradientRollout",
    "LayerReciproCAM",
    "reciprocal_masks",
]
__version__ = "0.1.0"

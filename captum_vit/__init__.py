"""captum_vit: class-specific explanations of Vision Transformers for Captum.

Methods (Captum ``Attribution`` subclasses with ``attribute(inputs, target=...)``):

- `LayerReciproCAM`: ViT-ReciproCAM, gradient-free token masking.
- `AttentionGuidedGradCAM`: AGCAM, sigmoid-guided attention gradients.
- `AttentionRollout`, `GradientRollout` (Chefer et al., ICCV 2021) and
  `TransformerAttribution` (Chefer et al.'s LRP relevance): the baselines.
- `AttnLRP` (Achtibat et al., ICML 2024) and `LeGrad` (Bousselham et al.,
  ICCV 2025): the field's current methods.

Models: timm ViT/DeiT/NaFlexViT/EVA/BEiT/relative-position ViTs/CaiT/XCiT/PiT, torchvision,
transformers and open_clip ViTs, timm, torchvision and transformers Swin (ViT-ReciproCAM
and LayerGradCam), each through one adapter in `captum_vit.adapters`.
Metrics live in `captum_vit.metrics`. Importing this package does not
import matplotlib.
"""

from .adapters import UnsupportedModelError
from .agcam import AttentionGuidedGradCAM
from .attnlrp import AttnLRP
from .legrad import LeGrad
from .reciprocam import LayerReciproCAM, reciprocal_masks
from .relevance import TransformerAttribution
from .rollout import AttentionRollout, GradientRollout

__all__ = [
    "AttentionGuidedGradCAM",
    "AttentionRollout",
    "AttnLRP",
    "GradientRollout",
    "LayerReciproCAM",
    "LeGrad",
    "reciprocal_masks",
    "TransformerAttribution",
    "UnsupportedModelError",
]
__version__ = "0.5.0"

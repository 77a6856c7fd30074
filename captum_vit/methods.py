"""Every method by name, as ``explain(inputs, target) -> maps``.

The command line, the demo, the benchmarks and the metrics all take methods
from here, so a comparison runs each one the same way:

=================  ==========================================  ===============
name               what                                        map
=================  ==========================================  ===============
reciprocam         LayerReciproCAM, 3x3 gaussian kernel        (B, 1, h, w)
reciprocam-dirac   LayerReciproCAM, one cell per copy          (B, 1, h, w)
agcam              AttentionGuidedGradCAM, every block         (B, 1, h, w)
rollout            AttentionRollout (class-agnostic)           (B, 1, h, w)
grad-rollout       GradientRollout                             (B, 1, h, w)
ig                 Captum IntegratedGradients, |sum over C|    (B, 1, H, W)
layergradcam       Captum LayerGradCam, last block's norm1     (B, 1, h, w)
random             uniform noise: a control                    (B, 1, h, w)
=================  ==========================================  ===============
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

from .adapters import find_adapter
from .agcam import AttentionGuidedGradCAM
from .baselines import integrated_gradients_map, vit_layer_gradcam
from .reciprocam import LayerReciproCAM
from .rollout import AttentionRollout, GradientRollout

ExplainFn = Callable[[Tensor, Any], Tensor]

METHODS = ("reciprocam", "reciprocam-dirac", "agcam", "rollout", "grad-rollout", "ig", "layergradcam", "random")

#: Short descriptions, for help texts and figure titles.
TITLES: Dict[str, str] = {
    "reciprocam": "ViT-ReciproCAM",
    "reciprocam-dirac": "ViT-ReciproCAM (dirac)",
    "agcam": "AGCAM",
    "rollout": "Attention Rollout",
    "grad-rollout": "Gradient Rollout",
    "ig": "Integrated Gradients",
    "layergradcam": "LayerGradCam",
    "random": "random control",
}


def explainer(
    name: str,
    forward_func: Callable[..., Any],
    vit: Optional[nn.Module] = None,
    batch_size: Optional[int] = None,
    ig_steps: int = 50,
    seed: int = 0,
) -> ExplainFn:
    """``explain(inputs, target)`` for method ``name`` (see the module table).

    Args:
        name: one of :data:`METHODS`.
        forward_func: the model or a module/callable around it.
        vit: the ViT inside ``forward_func``, when it cannot be found.
        batch_size: each method's own chunk size (copies for ReciproCAM,
            images for the attention methods, IG's ``internal_batch_size``).
        ig_steps: IntegratedGradients ``n_steps``.
        seed: seed of the random control.

    The returned function gives unnormalised maps for Captum's baselines and
    min-max normalised maps for the rest, each ``(B, 1, ...)`` as the table.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    if name in ("reciprocam", "reciprocam-dirac"):
        adapter = find_adapter(forward_func, None, vit)
        cam = LayerReciproCAM(forward_func, adapter.blocks[-1], vit=adapter.model)
        kernel = "dirac" if name == "reciprocam-dirac" else "gaussian"
        return lambda x, t: cam.attribute(x, target=t, kernel=kernel, batch_size=batch_size)
    if name in ("agcam", "rollout", "grad-rollout"):
        cls = {"agcam": AttentionGuidedGradCAM, "rollout": AttentionRollout, "grad-rollout": GradientRollout}[name]
        method = cls(forward_func, vit=vit)
        return lambda x, t: method.attribute(x, target=t, batch_size=batch_size)
    if name == "ig":
        ig = IntegratedGradients(forward_func)
        return lambda x, t: integrated_gradients_map(ig, x, t, n_steps=ig_steps, internal_batch_size=batch_size)
    if name == "layergradcam":
        gradcam = vit_layer_gradcam(forward_func, vit=vit)
        return lambda x, t: gradcam.attribute(x, target=t, relu_attributions=True)
    adapter = find_adapter(forward_func, None, vit)
    generator = torch.Generator().manual_seed(seed)

    def random_map(x: Tensor, t: Any) -> Tensor:
        h, w = adapter.grid_for(x.shape[-2:])
        return torch.rand(x.shape[0], 1, h, w, generator=generator).to(x.device)

    return random_map

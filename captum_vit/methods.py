"""Every method by name, as ``explain(inputs, target) -> maps``.

The command line, the demo, the benchmarks and the metrics all take methods
from this one registry, so a comparison runs each one the same way:

=================  ===============================================  ===============
name               what                                             map
=================  ===============================================  ===============
reciprocam         LayerReciproCAM, 3x3 gaussian kernel (the spec)  (B, 1, h, w)
reciprocam-input   LayerReciproCAM, masked block input as residual, (B, 1, h, w)
                   raw logits (the authors' OpenVINO XAI variant)
reciprocam-dirac   LayerReciproCAM, one cell per copy               (B, 1, h, w)
agcam              AttentionGuidedGradCAM, every block              (B, 1, h, w)
rollout            AttentionRollout (class-agnostic)                (B, 1, h, w)
grad-rollout       GradientRollout                                  (B, 1, h, w)
relevance          TransformerAttribution (Chefer et al. LRP)       (B, 1, h, w)
ig                 Captum IntegratedGradients, |sum over C|         (B, 1, H, W)
layergradcam       Captum LayerGradCam, last block's norm1          (B, 1, h, w)
random             uniform noise: a control                         (B, 1, h, w)
=================  ===============================================  ===============
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

from .adapters import find_adapter
from .agcam import AttentionGuidedGradCAM
from .baselines import integrated_gradients_map, vit_layer_gradcam
from .reciprocam import LayerReciproCAM
from .relevance import TransformerAttribution
from .rollout import AttentionRollout, GradientRollout

ExplainFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    ``class_specific``: the map depends on the target (False for rollout and
    the random control); ``input_resolution``: maps come at the input's
    resolution rather than the patch grid; ``options``: the keyword
    arguments passed to ``attribute``.
    """

    name: str
    title: str
    class_specific: bool = True
    input_resolution: bool = False
    options: Tuple[Tuple[str, Any], ...] = ()


_SPECS = (
    MethodSpec("reciprocam", "ViT-ReciproCAM"),
    MethodSpec(
        "reciprocam-input",
        "ViT-ReciproCAM (input residual, logits)",
        options=(("residual", "input"), ("scores", "logits")),
    ),
    MethodSpec("reciprocam-dirac", "ViT-ReciproCAM (dirac)", options=(("kernel", "dirac"),)),
    MethodSpec("agcam", "AGCAM"),
    MethodSpec("rollout", "Attention Rollout", class_specific=False),
    MethodSpec("grad-rollout", "Gradient Rollout"),
    MethodSpec("relevance", "Relevance (Chefer LRP)"),
    MethodSpec("ig", "Integrated Gradients", input_resolution=True),
    MethodSpec("layergradcam", "LayerGradCam"),
    MethodSpec("random", "random control", class_specific=False),
)

#: name -> entry, in table order
REGISTRY: Dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
#: every method name, in table order
METHODS = tuple(REGISTRY)
#: short descriptions, for help texts and figure titles
TITLES: Dict[str, str] = {spec.name: spec.title for spec in _SPECS}


class MethodExplainer:
    """``explain(inputs, target) -> maps`` for one registry method, with its identity.

    ``identity`` names the method and every option that changes its maps;
    :func:`captum_vit.metrics.evaluate_adcc` writes it to checkpoint manifests.
    """

    def __init__(self, spec: MethodSpec, fn: ExplainFn, options: Dict[str, Any]) -> None:
        self.spec = spec
        self.fn = fn
        self.identity = spec.name + "".join(f" {k}={v!r}" for k, v in sorted(options.items()))

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, inputs: Tensor, target: Any = None) -> Tensor:
        return self.fn(inputs, target)

    def __repr__(self) -> str:
        return f"MethodExplainer({self.identity})"


def explainer(
    name: str,
    forward_func: Callable[..., Any],
    vit: Optional[nn.Module] = None,
    batch_size: Optional[int] = None,
    ig_steps: int = 50,
    seed: int = 0,
    normalize: bool = True,
) -> MethodExplainer:
    """``explain(inputs, target)`` for method ``name`` (see the module table).

    Args:
        name: one of :data:`METHODS`.
        forward_func: the model or a module/callable around it.
        vit: the ViT inside ``forward_func``, when it cannot be found.
        batch_size: each method's own chunk size (copies for ReciproCAM,
            images for the attention methods, IG's ``internal_batch_size``).
        ig_steps: IntegratedGradients ``n_steps``.
        seed: seed of the random control.
        normalize: min-max scale captum_vit's own methods' maps per image
            (their ``attribute(normalize=...)``); ``False`` gives raw scores.

    The returned function gives unnormalised maps for Captum's baselines and
    the random control, and maps scaled as ``normalize`` says for the rest,
    each ``(B, 1, ...)`` as the table.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    spec = REGISTRY[name]
    options = dict(spec.options)
    if not normalize:
        options["normalize"] = False
    if name.startswith("reciprocam"):
        adapter = find_adapter(forward_func, None, vit)
        cam = LayerReciproCAM(forward_func, adapter.blocks[-1], vit=adapter.model)
        fn: ExplainFn = lambda x, t: cam.attribute(x, target=t, batch_size=batch_size, **options)  # noqa: E731
    elif name in ("agcam", "rollout", "grad-rollout", "relevance"):
        cls = {
            "agcam": AttentionGuidedGradCAM,
            "rollout": AttentionRollout,
            "grad-rollout": GradientRollout,
            "relevance": TransformerAttribution,
        }[name]
        method = cls(forward_func, vit=vit)
        fn = lambda x, t: method.attribute(x, target=t, batch_size=batch_size, **options)  # noqa: E731
    elif name == "ig":
        ig = IntegratedGradients(forward_func)
        options = {"n_steps": ig_steps}
        fn = lambda x, t: integrated_gradients_map(ig, x, t, n_steps=ig_steps, internal_batch_size=batch_size)  # noqa: E731
    elif name == "layergradcam":
        options = {}
        gradcam = vit_layer_gradcam(forward_func, vit=vit)
        fn = lambda x, t: gradcam.attribute(x, target=t, relu_attributions=True)  # noqa: E731
    else:
        adapter = find_adapter(forward_func, None, vit)
        generator = torch.Generator().manual_seed(seed)
        options = {"seed": seed}

        def fn(x: Tensor, t: Any) -> Tensor:
            h, w = adapter.grid_for(x.shape[-2:])
            return torch.rand(x.shape[0], 1, h, w, generator=generator).to(x.device)

    return MethodExplainer(spec, fn, options)

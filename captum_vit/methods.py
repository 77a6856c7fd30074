"""Every method by name, as ``explain(inputs, target) -> maps``.

The command line, the demo, the benchmarks and the metrics all take methods
from this one registry, so a comparison runs each one the same way. Each
entry builds its explainer (`MethodSpec.build`); a new method is its
module plus one entry here (a test keeps this table equal to the registry):

========================  =================================================================  ===============
name                      what                                                               map
========================  =================================================================  ===============
reciprocam                ViT-ReciproCAM, the setting chosen by leave-one-model-out on the   (B, 1, h, w)
                          known-evidence zoo (docs/evidence.md): block -3, one cell per
                          copy (dirac), masked block input as residual, raw logits
reciprocam-authors        ViT-ReciproCAM as its authors' repository runs it: block -2,       (B, 1, h, w)
                          unmasked residual, 3x3 gaussian kernel, softmax
reciprocam-fast           ViT-ReciproCAM at the last block, masked normalised residual       (B, 1, h, w)
                          (OpenVINO Training Extensions 1.x): about one extra forward pass
reciprocam-input          ViT-ReciproCAM at the last block, masked block input as residual,  (B, 1, h, w)
                          raw logits (OpenVINO XAI 1.1)
reciprocam-input-dirac    ``reciprocam-input`` with one cell per copy (dirac): the last-     (B, 1, h, w)
                          block setting chosen by leave-one-model-out
reciprocam-dirac          ViT-ReciproCAM as ``reciprocam-authors``, one cell per copy        (B, 1, h, w)
agcam                     AttentionGuidedGradCAM, every block                                (B, 1, h, w)
rollout                   AttentionRollout (class-agnostic)                                  (B, 1, h, w)
grad-rollout              GradientRollout: Chefer et al., ICCV 2021 (their Eq. 5-6)          (B, 1, h, w)
relevance                 TransformerAttribution (Chefer et al. LRP)                         (B, 1, h, w)
attnlrp                   AttnLRP as LXT runs a ViT (CP-LRP attention, gamma 0.25 / 0.05),   (B, 1, H, W)
                          signed pixel relevance
legrad                    LeGrad as its authors' code: the last two blocks, token mean       (B, 1, h, w)
ig                        Captum IntegratedGradients, abs of the sum over channels           (B, 1, H, W)
layergradcam              Captum LayerGradCam, last block's norm1                            (B, 1, h, w)
random                    uniform noise: a control, not an explainer                         (B, 1, h, w)
========================  =================================================================  ===============
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

from ._utils import check_choice
from .adapters import UnsupportedModelError, find_adapter
from .agcam import AttentionGuidedGradCAM
from .attnlrp import ATTENTION_RULES, SPACES, AttnLRP
from .baselines import integrated_gradients_map, vit_layer_gradcam
from .legrad import POOLINGS, LeGrad
from .reciprocam import KERNELS, RESIDUALS, SCORES, LayerReciproCAM
from .relevance import TransformerAttribution
from .rollout import AttentionRollout, GradientRollout

ExplainFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class BuildContext:
    """What every entry's builder receives (see `explainer` for each field)."""

    forward_func: Callable[..., Any]
    vit: Optional[nn.Module] = None
    batch_size: Optional[int] = None
    ig_steps: int = 50
    seed: int = 0
    normalize: bool = True
    #: the caller's options for this method (``block``, ``kernel``, ``residual``, ``scores`` for ViT-ReciproCAM;
    #: ``layers`` for the attention methods); each builder takes the ones that apply and refuses the rest
    options: Dict[str, Any] = field(default_factory=dict)

    def refuse_options(self, name: str, accepted: Tuple[str, ...] = ()) -> None:
        extra = sorted(set(self.options) - set(accepted))
        if extra:
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
            raise ValueError(f"{name} has no option {', '.join(extra)}; {takes}.")


#: a builder: the context -> (explain function, the options that change its maps)
Builder = Callable[[BuildContext], Tuple[ExplainFn, Dict[str, Any]]]


def block_indices(text: str) -> List[int]:
    """``"-1,-2"`` -> ``[-1, -2]``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected block indices separated by commas (e.g. -1,-2), got {text!r}") from None


def yes_no(text: str) -> bool:
    """``"yes"``/``"no"`` (or true/false, 1/0) -> a bool."""
    value = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError(f"expected yes or no, got {text!r}")
    return value


@dataclass(frozen=True)
class OptionSpec:
    """One option a method takes: its name (the keyword of `explainer`), how a text value is read (the CLI's
    ``--name`` flag), its choices where they are enumerated, and what it does."""

    name: str
    help: str
    parse: Callable[[str], Any] = str
    choices: Optional[Tuple[str, ...]] = None
    #: the value may start with "-" (block indices): the CLI joins "--block -2" as "--block=-2"
    negative: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


RECIPROCAM_OPTION_SPECS = (
    OptionSpec("block", "ViT-ReciproCAM's block, from the end as -1 (default: each entry's, -3 for reciprocam)",
               int, negative=True),
    OptionSpec("kernel", "ViT-ReciproCAM's mask kernel", choices=KERNELS),
    OptionSpec("residual", "ViT-ReciproCAM's residual of the masked block (docs/methods.md 1.1)", choices=RESIDUALS),
    OptionSpec("scores", "ViT-ReciproCAM's score of each masked copy", choices=SCORES),
    OptionSpec("keep_prefix_tokens", "ViT-ReciproCAM: keep the class/register tokens in every copy (yes, default) "
               "or mask them (no)", yes_no),
)
LAYERS_OPTION = OptionSpec("layers", "the blocks the method reads, e.g. -1,-2 (default: every block; LeGrad: the "
                           "last two)", block_indices, negative=True)
ATTNLRP_OPTION_SPECS = (
    OptionSpec("attention_rule", "AttnLRP inside the attention: cp (LXT's ViT setting) or attnlrp (uniform rule)",
               choices=ATTENTION_RULES),
    OptionSpec("linear_gamma", "AttnLRP's gamma of the linear layers (default 0.05)", float),
    OptionSpec("conv_gamma", "AttnLRP's gamma of the patch embedding (default 0.25)", float),
    OptionSpec("space", "AttnLRP's maps: pixels or grid (each patch's pixels summed)", choices=SPACES),
)
POOLING_OPTION = OptionSpec("pooling", "LeGrad: each block's tokens pooled by their mean (the authors') or by the "
                            "model's own pooling", choices=POOLINGS)


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    ``class_specific``: the map depends on the target (False for rollout and
    the random control); ``control``: a reference map, not an explainer
    (offered by the benchmarks, not the CLI); ``seeded``: its maps draw
    random numbers from the build's ``seed`` (an evaluation builds it per
    batch with a batch seed; every other entry once per run); ``builder``
    makes its explain function.
    """

    name: str
    title: str
    builder: Builder = field(repr=False)
    class_specific: bool = True
    control: bool = False
    seeded: bool = False
    #: the options the method takes (the CLI's flags are made from these)
    options: Tuple[OptionSpec, ...] = ()

    def build(self, context: BuildContext) -> "MethodExplainer":
        context.refuse_options(self.title, tuple(o.name for o in self.options))
        for option in self.options:  # a misspelt choice is refused now, not at the first explanation
            if option.choices is not None and option.name in context.options:
                check_choice(context.options[option.name], option.name, option.choices)
        fn, options = self.builder(context)
        return MethodExplainer(self, fn, options)


class MethodExplainer:
    """``explain(inputs, target) -> maps`` for one registry method, with its identity.

    ``options`` are the options that change its maps (the entry's and the
    caller's); ``identity`` names the method and each of them;
    `captum_vit.metrics.evaluate_adcc` writes it to checkpoint manifests.
    """

    def __init__(self, spec: MethodSpec, fn: ExplainFn, options: Dict[str, Any]) -> None:
        self.spec = spec
        self.fn = fn
        self.options = dict(options)
        self.identity = spec.name + "".join(f" {k}={v!r}" for k, v in sorted(options.items()))

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, inputs: Tensor, target: Any = None) -> Tensor:
        return self.fn(inputs, target)

    def __repr__(self) -> str:
        return f"MethodExplainer({self.identity})"


# -- builders ----------------------------------------------------------------------
def reciprocam_builder(block: int, **defaults: Any) -> Builder:
    """ViT-ReciproCAM on block ``block`` (negative: from the end) with ``attribute`` options; the caller's
    options (`RECIPROCAM_OPTION_SPECS`) override them."""

    def build(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
        options = dict(defaults, **{k: v for k, v in context.options.items() if k != "block"})
        chosen = int(context.options.get("block", block))
        return _reciprocam(context, chosen, options)

    return build


def _reciprocam(context: BuildContext, block: int, options: Dict[str, Any]) -> Tuple[ExplainFn, Dict[str, Any]]:
    adapter = find_adapter(context.forward_func, None, context.vit)
    depth = len(adapter.blocks)
    if not -depth <= block < depth:
        raise UnsupportedModelError(
            f"this entry explains block {block}, and the model has {depth} block(s); explain the last block "
            f"with 'reciprocam-fast', or choose a block (CLI: --block) from -1 to -{depth}."
        )
    cam = LayerReciproCAM(context.forward_func, adapter.blocks[block], vit=adapter.model)
    kw = dict(options, normalize=context.normalize, batch_size=context.batch_size)
    return (lambda x, t: cam.attribute(x, target=t, **kw)), dict(options, block=block, normalize=context.normalize)


def attention_builder(cls: Type[Any]) -> Builder:
    """An `~captum_vit._attention.AttentionExplainer` over every block."""

    def build(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
        extra = {"layers": context.options["layers"]} if "layers" in context.options else {}
        method = cls(context.forward_func, vit=context.vit, **extra)
        kw = dict(normalize=context.normalize, batch_size=context.batch_size)
        return (lambda x, t: method.attribute(x, target=t, **kw)), {"normalize": context.normalize, **extra}

    return build


def _attnlrp(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
    method = AttnLRP(context.forward_func, vit=context.vit, **context.options)
    kw = dict(normalize=context.normalize, batch_size=context.batch_size)
    return (lambda x, t: method.attribute(x, target=t, **kw)), {"normalize": context.normalize, **context.options}


def _legrad(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
    method = LeGrad(context.forward_func, vit=context.vit, **context.options)
    kw = dict(normalize=context.normalize, batch_size=context.batch_size)
    return (lambda x, t: method.attribute(x, target=t, **kw)), {"normalize": context.normalize, **context.options}


def _integrated_gradients(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
    ig = IntegratedGradients(context.forward_func)
    steps, batch = context.ig_steps, context.batch_size
    return (lambda x, t: integrated_gradients_map(ig, x, t, n_steps=steps, internal_batch_size=batch)), {
        "n_steps": steps}


def _layer_gradcam(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
    gradcam = vit_layer_gradcam(context.forward_func, vit=context.vit)
    return (lambda x, t: gradcam.attribute(x, target=t, relu_attributions=True)), {}


def _random_control(context: BuildContext) -> Tuple[ExplainFn, Dict[str, Any]]:
    adapter = find_adapter(context.forward_func, None, context.vit)
    generator = torch.Generator().manual_seed(context.seed)

    def fn(x: Tensor, t: Any) -> Tensor:
        h, w = adapter.grid_for(x.shape[-2:])
        return torch.rand(x.shape[0], 1, h, w, generator=generator).to(x.device)

    return fn, {"seed": context.seed}


_SPECS = (
    # chosen by leave-one-model-out on the known-evidence zoo (docs/evidence.md, specification 5b)
    MethodSpec("reciprocam", "ViT-ReciproCAM",
               reciprocam_builder(-3, kernel="dirac", residual="input", scores="logits"),
               options=RECIPROCAM_OPTION_SPECS),
    MethodSpec("reciprocam-authors", "ViT-ReciproCAM (authors)",
               reciprocam_builder(-2, residual="unmasked"), options=RECIPROCAM_OPTION_SPECS),
    MethodSpec("reciprocam-fast", "ViT-ReciproCAM (last block)",
               reciprocam_builder(-1, residual="normalized"), options=RECIPROCAM_OPTION_SPECS),
    MethodSpec("reciprocam-input", "ViT-ReciproCAM (last block, input residual, logits)",
               reciprocam_builder(-1, residual="input", scores="logits"), options=RECIPROCAM_OPTION_SPECS),
    MethodSpec("reciprocam-input-dirac", "ViT-ReciproCAM (last block, dirac, input residual, logits)",
               reciprocam_builder(-1, kernel="dirac", residual="input", scores="logits"),
               options=RECIPROCAM_OPTION_SPECS),
    MethodSpec("reciprocam-dirac", "ViT-ReciproCAM (authors', dirac)",
               reciprocam_builder(-2, residual="unmasked", kernel="dirac"), options=RECIPROCAM_OPTION_SPECS),
    MethodSpec("agcam", "AGCAM", attention_builder(AttentionGuidedGradCAM), options=(LAYERS_OPTION,)),
    MethodSpec("rollout", "Attention Rollout", attention_builder(AttentionRollout), class_specific=False,
               options=(LAYERS_OPTION,)),
    MethodSpec("grad-rollout", "Gradient Rollout (Chefer et al., ICCV 2021)", attention_builder(GradientRollout),
               options=(LAYERS_OPTION,)),
    MethodSpec("relevance", "Relevance (Chefer LRP)", attention_builder(TransformerAttribution)),
    MethodSpec("attnlrp", "AttnLRP", _attnlrp, options=ATTNLRP_OPTION_SPECS),
    MethodSpec("legrad", "LeGrad", _legrad, options=(LAYERS_OPTION, POOLING_OPTION)),
    MethodSpec("ig", "Integrated Gradients", _integrated_gradients),
    MethodSpec("layergradcam", "LayerGradCam", _layer_gradcam),
    MethodSpec("random", "random control", _random_control, class_specific=False, control=True, seeded=True),
)

#: name -> entry, in table order
REGISTRY: Dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
#: every method name, in table order
METHODS = tuple(REGISTRY)
#: the explainers a user picks from (the CLI's choices): every entry but the controls
EXPLAINERS = tuple(name for name, spec in REGISTRY.items() if not spec.control)
#: every option any method takes, by name (one spec per name), in table order
OPTIONS: Dict[str, OptionSpec] = {o.name: o for spec in _SPECS for o in spec.options}
#: short descriptions, for help texts and figure titles
TITLES: Dict[str, str] = {spec.name: spec.title for spec in _SPECS}


def explainer(
    name: str,
    forward_func: Callable[..., Any],
    vit: Optional[nn.Module] = None,
    batch_size: Optional[int] = None,
    ig_steps: int = 50,
    seed: int = 0,
    normalize: bool = True,
    **options: Any,
) -> MethodExplainer:
    """``explain(inputs, target)`` for method ``name`` (see the module table).

    Args:
        name: one of `METHODS`.
        forward_func: the model or a module/callable around it.
        vit: the ViT inside ``forward_func``, when it cannot be found.
        batch_size: each method's own chunk size (copies for ReciproCAM,
            images for the attention methods, IG's ``internal_batch_size``).
        ig_steps: IntegratedGradients ``n_steps``.
        seed: seed of the random control.
        normalize: min-max scale captum_vit's own methods' maps per image
            (their ``attribute(normalize=...)``); ``False`` gives raw scores.
        options: the method's own options, overriding the entry's: ``block``,
            ``kernel``, ``residual``, ``scores``, ``keep_prefix_tokens`` for
            ViT-ReciproCAM; ``layers`` for AGCAM, the rollouts and LeGrad
            (and LeGrad's ``pooling``); ``attention_rule``, ``linear_gamma``,
            ``conv_gamma``, ``space`` for AttnLRP. An option the method does
            not take is refused.

    The returned function gives unnormalised maps for Captum's baselines and
    the random control, and maps scaled as ``normalize`` says for the rest,
    each ``(B, 1, ...)`` as the table.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    context = BuildContext(forward_func, vit=vit, batch_size=batch_size, ig_steps=ig_steps, seed=seed,
                           normalize=normalize, options=options)
    return REGISTRY[name].build(context)

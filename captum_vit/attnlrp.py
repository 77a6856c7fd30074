r"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML 2024), in the gradient x input form of the authors' library LXT.

Each rule is a backward pass that differs from the gradient where the rule
differs from it; the relevance of the input is then ``x * grad``. The forward
values are the model's own: every hook returns the module's output with a
different backward attached, and every hook is removed when the call ends.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution
from torch import Tensor, nn

from ._attention import AttentionRecorder
from ._attribution import ViTAttribution
from ._utils import (
    HookSet,
    Targets,
    calling_forward_func,
    check_choice,
    forward_logits,
    module_of,
)
from .adapters import (
    ROLE_ACTIVATION,
    ROLE_NORM,
    ROLE_WEIGHTED,
    UnsupportedModelError,
    is_gated_mlp,
    relevance_role,
)

#: LXT's stabiliser of the identity rule and of the division by the input (gradient x input form)
INPUT_EPSILON = 1e-10
#: zennit's default stabiliser of the gamma rule's denominators
GAMMA_STABILIZER = 1e-6
#: the attention rules: ``"cp"`` (LXT's ViT setting), ``"attnlrp"`` (the paper's uniform rule)
ATTENTION_RULES = ("cp", "attnlrp")
#: the maps: ``"pixels"`` (``x * grad`` summed over channels, LXT's) or ``"grid"`` (summed per patch)
SPACES = ("pixels", "grid")


def stabilize(t: Tensor, epsilon: float) -> Tensor:
    """``t + epsilon * sign(t)``, with ``sign(0) = +1`` (zennit's ``stabilize``)."""
    return t + epsilon * ((t == 0).to(t.dtype) + t.sign())


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient divided by ``factor`` (the uniform rule of a product)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad / ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    """An element-wise activation's output, with LXT's identity rule as its gradient: ``f(x) / (x + eps)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output: Tensor) -> Tensor:
        ctx.save_for_backward(output / (x + INPUT_EPSILON))
        return output.clone()  # not a view: a caller may modify it in place (NaFlexViT adds its positions so)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


def gamma_relevance(
    layer: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor],
    x: Tensor, output: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: float, relevance: Tensor,
) -> Tensor:
    r"""The generalised LRP-\(\gamma\) rule (zennit's ``Gamma``), from the output's relevance to the input's.

    With \(W^{\uparrow} = W + \gamma W^+\), \(W^{\downarrow} = W + \gamma W^-\)
    (biases alike), \(z^{\uparrow} = W^{\uparrow} x^+ + b^{\uparrow} + W^{\downarrow} x^-\)
    where the output is positive and \(z^{\downarrow} = W^{\downarrow} x^+ + b^{\downarrow}
    + W^{\uparrow} x^-\) where it is negative, each output's relevance is shared
    among the inputs in proportion to their terms of \(z^{\uparrow}\) (or
    \(z^{\downarrow}\)); outputs that are exactly zero pass nothing on.

    Args:
        layer: ``(x, weight, bias) -> output``, the layer's own operation.
        x: the layer's input.
        output: the layer's output.
        weight: the layer's weight.
        bias: the layer's bias, or ``None``.
        gamma: \(\gamma\).
        relevance: the output's relevance, shaped as ``output``.
    """
    up = lambda p: None if p is None else p + gamma * p.clamp(min=0)  # noqa: E731
    down = lambda p: None if p is None else p + gamma * p.clamp(max=0)  # noqa: E731
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    with torch.enable_grad():
        inputs = [x.clamp(min=0), x.clamp(max=0), x.clamp(min=0), x.clamp(max=0)]
        inputs = [i.detach().requires_grad_(True) for i in inputs]
        outs = [layer(inputs[0], up(weight), up(bias)), layer(inputs[1], down(weight), None),
                layer(inputs[2], down(weight), down(bias)), layer(inputs[3], up(weight), None)]
        positive = relevance * (output > 0).to(relevance.dtype) / stabilize(outs[0] + outs[1], GAMMA_STABILIZER)
        negative = relevance * (output < 0).to(relevance.dtype) / stabilize(outs[2] + outs[3], GAMMA_STABILIZER)
        grads = torch.autograd.grad(outs, inputs, [positive, positive, negative, negative])
    return sum(i * g for i, g in zip(inputs, grads))


class _GammaRule(torch.autograd.Function):
    """A linear or convolutional layer's output; its gradient is the gamma rule's relevance over the input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output: Tensor, layer: Callable[..., Tensor], weight: Tensor,
                bias: Optional[Tensor], gamma: float) -> Tensor:
        ctx.save_for_backward(x, output)
        ctx.layer, ctx.weight, ctx.bias, ctx.gamma = layer, weight, bias, gamma
        return output.clone()  # not a view: a caller may modify it in place (NaFlexViT adds its positions so)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, output = ctx.saved_tensors
        relevance = gamma_relevance(ctx.layer, x, output, ctx.weight, ctx.bias, ctx.gamma, grad * output)
        return relevance / stabilize(x, INPUT_EPSILON), None, None, None, None, None


class ConservativeAttention:
    """CP-LRP inside the attention (Ali et al., ICML 2022; LXT's ViT setting): ``A`` is a constant."""

    def values(self, v: Tensor) -> Tensor:
        return v

    def scores(self, scores: Tensor) -> Tensor:
        return scores

    def weights(self, weights: Tensor) -> Tensor:
        return weights.detach()


class UniformAttention:
    """AttnLRP's rules inside the attention: the uniform rule halves the relevance at each operand of
    ``q k^T`` and of ``A v`` (so ``S`` keeps a quarter, ``v`` a half), and the softmax is gradient x input."""

    def values(self, v: Tensor) -> Tensor:
        return _ScaledGradient.apply(v, 2.0)

    def scores(self, scores: Tensor) -> Tensor:
        return _ScaledGradient.apply(scores, 4.0)

    def weights(self, weights: Tensor) -> Tensor:
        return weights


def _layer_function(module: nn.Module) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
    if isinstance(module, nn.Linear):
        return F.linear
    conv: nn.Conv2d = module  # type: ignore[assignment]
    return lambda x, w, b: F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


class AttnLRP(ViTAttribution, GradientAttribution):
    r"""AttnLRP (Achtibat et al., ICML 2024) as its authors' library LXT runs a ViT.

    One forward and one backward pass per target column, in the gradient x
    input form: the relevance of pixel \(x_i\) is \(x_i\,\tilde\nabla_i y_c\)
    summed over the colour channels, where \(\tilde\nabla\) is the gradient
    with each layer's rule in place of its derivative:

    - linear and convolutional layers outside the attention: the generalised
      LRP-\(\gamma\) rule (`gamma_relevance`; ``linear_gamma``,
      ``conv_gamma``);
    - layer norms: the identity rule (the standard deviation a constant);
    - element-wise activations (GELU, QuickGELU, SiLU): the identity rule,
      \(\partial \to f(x)/(x + 10^{-10})\);
    - inside the attention, ``attention_rule="cp"`` (default; LXT's ViT
      example): CP-LRP, \(A\) a constant, the value path plain gradient;
      ``"attnlrp"``: the paper's uniform rule on both matrix products
      (\(v\) keeps half the relevance, the scores a quarter) and the softmax
      as gradient x input;
    - residual sums, layer scale, dropout, pooling: plain gradient.

    The projections inside the attention (``qkv``, ``proj``) take the plain
    gradient, as they do in LXT's torchvision example (where they are not
    ``nn.Linear`` modules). The maps are input-space, ``(B, 1, H, W)``
    (``space="pixels"``), or the relevance of each patch's pixels summed on the
    patch grid, ``(B, 1, h, w)`` (``space="grid"``). Signed: positive pixels
    speak for the target. A model in float16 or bfloat16 is explained on a
    float32 copy (its rules divide by sums that round badly in half precision).

    Refused: models with attention the adapters have no explicit form for,
    gated MLPs (SwiGLU: the product of the two branches needs a rule inside
    the MLP), and layers no rule covers (named in the message).
    """

    needs_gradients = True
    copy_fallback = "a float32 model"

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        vit: Optional[nn.Module] = None,
        *,
        attention_rule: str = "cp",
        linear_gamma: float = 0.05,
        conv_gamma: float = 0.25,
        space: str = "pixels",
    ) -> None:
        r"""
        Args:
            forward_func: the model, or a module/callable around it, mapping
                ``(B, C, H, W)`` images to ``(B, num_classes)`` logits.
            vit: the model, when ``forward_func`` is not a module containing it.
            attention_rule: ``"cp"`` (default) or ``"attnlrp"`` (see above).
            linear_gamma: \(\gamma\) of the linear layers (LXT's example
                sweeps 0, 0.01, 0.05, 0.1, 1; default 0.05).
            conv_gamma: \(\gamma\) of the patch embedding's convolution
                (LXT's example sweeps 0.1, 0.25, 100; default 0.25).
            space: ``"pixels"`` (default) or ``"grid"``.
        """
        check_choice(attention_rule, "attention_rule", ATTENTION_RULES)
        check_choice(space, "space", SPACES)
        for name, gamma in (("linear_gamma", linear_gamma), ("conv_gamma", conv_gamma)):
            if not gamma >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {gamma!r}.")
        super().__init__(forward_func, vit)
        self.attention_rule, self.space = attention_rule, space
        self.linear_gamma, self.conv_gamma = float(linear_gamma), float(conv_gamma)
        self.refuse_attention_refusal()
        self.views = self.explicit_views(range(len(self.adapter.blocks)), "for its attention rule")
        self.roles = self._layer_roles()

    def _layer_roles(self) -> Dict[nn.Module, str]:
        """Every leaf layer of the model (and of a module around it) outside the attention, with its rule."""
        name = self.who
        owner = module_of(self.forward_func)  # type: ignore[attr-defined]
        root = owner if isinstance(owner, nn.Module) and any(m is self.adapter.model for m in owner.modules()) \
            else self.adapter.model
        inside_attention = {id(m) for view in self.views for m in view.attention_module.modules()}
        roles: Dict[nn.Module, str] = {}
        for path, module in root.named_modules():
            if id(module) in inside_attention:
                continue
            if is_gated_mlp(module):
                raise UnsupportedModelError(
                    f"{name}: {path} is a gated MLP ({type(module).__name__}); the product of its two branches "
                    "needs AttnLRP's uniform rule inside the MLP, which captum_vit does not apply. Use "
                    "LayerReciproCAM or IntegratedGradients for this model."
                )
            if any(True for _ in module.children()):
                continue
            role = relevance_role(module)
            if role is None:
                raise UnsupportedModelError(
                    f"{name} has no relevance rule for {path} ({type(module).__name__}); the rules cover linear "
                    "and convolutional layers, layer norms, element-wise activations and layers linear in their "
                    "input. Use LayerReciproCAM or IntegratedGradients for this model."
                )
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise UnsupportedModelError(f"{name}: {path} pads with {module.padding_mode!r}; only zero padding.")
            roles[module] = role
        return roles

    def precision_for(self, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """A float16/bfloat16 model is explained on a float32 copy; any other in its own precision."""
        return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype

    def on_copy(self, forward_func: Callable[..., Any], vit: nn.Module, dtype: torch.dtype) -> "AttnLRP":
        return AttnLRP(forward_func, vit=vit, attention_rule=self.attention_rule, linear_gamma=self.linear_gamma,
                       conv_gamma=self.conv_gamma, space=self.space)

    def chunk_maps(self, args: Tuple[Any, ...], targets: Targets, rows: slice) -> Tensor:
        images = args[0].detach().clone().requires_grad_(True)  # a clone: inference tensors cannot enter a graph
        rule = ConservativeAttention() if self.attention_rule == "cp" else UniformAttention()
        recorder = AttentionRecorder(self.adapter, self.views, requires_grad=True, score_rows=0,
                                     keep_weights=lambda a: a.new_empty(0), rule=rule)
        with torch.enable_grad():
            with self.adapter.recording_image_size() as size, recorder, self._rule_hooks(), calling_forward_func():
                logits = forward_logits(self.forward_func, (images, *args[1:]))  # type: ignore[attr-defined]
            recorder.recorded()  # every attention ran in this thread, under its rule
            chosen = targets.resolve(logits.detach(), rows)
            maps = []
            for j in range(chosen.shape[1]):  # one backward per target column
                score = logits.gather(1, chosen[:, j : j + 1]).sum()
                (grad,) = torch.autograd.grad(score, images, retain_graph=j < chosen.shape[1] - 1)
                maps.append((images * grad).sum(dim=1, keepdim=True).detach())
        relevance = torch.cat(maps, dim=1)
        return relevance if self.space == "pixels" else self._on_grid(relevance, size.image_hw)

    def _on_grid(self, relevance: Tensor, image_hw: Optional[Tuple[int, int]]) -> Tensor:
        """Each patch's pixel relevance summed: ``(n, k, H, W) -> (n, k, h, w)``."""
        h, w = self.adapter.grid_for(image_hw or relevance.shape[-2:])
        H, W = relevance.shape[-2:]
        if H % h or W % w:
            raise UnsupportedModelError(f"{self.who}: the {H}x{W} image does not split into the {h}x{w} patch grid; "
                                        "use space='pixels'.")
        return F.avg_pool2d(relevance, (H // h, W // w)) * ((H // h) * (W // w))

    def _rule_hooks(self) -> HookSet:
        hooks = HookSet()
        for module, role in self.roles.items():
            if role == ROLE_WEIGHTED:
                gamma = self.conv_gamma if isinstance(module, nn.Conv2d) else self.linear_gamma
                hooks.forward_hook(module, _gamma_hook(gamma))
            elif role == ROLE_NORM:
                hooks.forward_hook(module, _norm_hook)
            elif role == ROLE_ACTIVATION:
                hooks.forward_hook(module, _activation_hook)
        return hooks


def _gamma_hook(gamma: float) -> Callable[..., Tensor]:
    def hook(module: nn.Module, args: Tuple[Any, ...], output: Tensor) -> Tensor:
        return _GammaRule.apply(args[0], output.detach(), _layer_function(module), module.weight, module.bias, gamma)

    return hook


def _norm_hook(module: nn.LayerNorm, args: Tuple[Any, ...], output: Tensor) -> Tensor:
    """The norm's own output, differentiated as if its standard deviation were a constant."""
    x = args[0]
    centred = x - x.mean(dim=-1, keepdim=True)
    std = (centred.pow(2).mean(dim=-1, keepdim=True) + module.eps).sqrt()
    surrogate = centred / std.detach()
    if module.weight is not None:
        surrogate = surrogate * module.weight
    return output.detach() + (surrogate - surrogate.detach())


def _activation_hook(module: nn.Module, args: Tuple[Any, ...], output: Tensor) -> Tensor:
    return _IdentityRule.apply(args[0], output.detach())


__all__: List[str] = ["AttnLRP", "ATTENTION_RULES", "SPACES", "gamma_relevance"]

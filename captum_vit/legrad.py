r"""LeGrad (Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers via
Feature Formation Sensitivity", ICCV 2025)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from ._attention import AttentionRecorder, resolve_blocks
from ._attribution import ViTAttribution
from ._utils import HookSet, Targets, calling_forward_func, check_choice, forward_logits

#: how a layer's tokens become its prediction: ``"mean"`` (the authors' code) or ``"model"`` (the model's pooling)
POOLINGS = ("mean", "model")


class LeGrad(ViTAttribution, GradientAttribution):
    r"""LeGrad (Bousselham et al., ICCV 2025), as its authors' code runs it.

    For each chosen block \(l\), the block's output tokens \(z_l\) are pooled
    and passed through the model's own head (final norm, projection,
    classifier), giving the block's own score \(s^l_c\) of the target class.
    Then

    \[
        E^l = \mathrm{mean}_{h,\,i}\ \mathrm{ReLU}\big(\partial s^l_c / \partial A^l\big)_{h,i,:},
        \qquad \mathrm{map} = \sum_l E^l \text{ at the patch columns},
    \]

    with \(A^l\) block \(l\)'s attention weights, the mean over heads \(h\)
    and every query row \(i\) (the authors' ``grad.mean(dim=1).mean(dim=1)``).
    ``pooling="mean"`` (default) pools every token's mean, as the authors'
    ``compute_legrad_clip`` does for any head; ``"model"`` uses the model's own
    pooling (its class token, or its average) instead. The blocks'
    predictions come from one forward pass: the head runs on the real output
    and on each chosen block's pooled tokens together. Each block's gradient
    is its own backward pass, from its own score to its own attention (the
    authors' one ``autograd.grad`` per layer).

    Their code upsamples each layer's map to the image before summing;
    upsampling is linear, so summing on the grid and upsampling once (the
    caller's choice, e.g. ``LayerAttribution.interpolate``) gives the same
    map. ``layers`` defaults to the authors' ``layer_index=-2``: the last two
    blocks.
    """

    needs_gradients = True

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        vit: Optional[nn.Module] = None,
        *,
        layers: Optional[Sequence[Any]] = (-2, -1),
        pooling: str = "mean",
    ) -> None:
        r"""
        Args:
            forward_func: the model, or a module/callable around it, mapping
                ``(B, C, H, W)`` images to ``(B, num_classes)`` logits.
            vit: the model, when ``forward_func`` is not a module containing it.
            layers: the blocks whose maps are summed, as indices or modules;
                default the last two (the authors' default); ``None``: every block.
            pooling: ``"mean"`` (default) or ``"model"`` (see above).
        """
        check_choice(pooling, "pooling", POOLINGS)
        super().__init__(forward_func, vit)
        self.refuse_attention_refusal()
        self.block_indices = resolve_blocks(self.adapter, layers)
        self.views = self.explicit_views(self.block_indices, "to differentiate the attention map")
        self.pooling = pooling

    def chunk_maps(self, args: Tuple[Any, ...], targets: Targets, rows: slice) -> Tensor:
        recorder = AttentionRecorder(self.adapter, self.views, requires_grad=True, score_rows=0)
        layer_tokens: List[Optional[Tensor]] = [None] * len(self.views)
        with torch.enable_grad():
            with self.adapter.recording_image_size() as size, recorder, \
                    self._head_on_every_layer(layer_tokens), calling_forward_func():
                logits = forward_logits(self.forward_func, args)  # type: ignore[attr-defined]
            _, weights = recorder.recorded()
            n = logits.shape[0] // (1 + len(self.views))
            chosen = targets.resolve(logits[:n].detach(), rows)  # the real prediction: the model's own output
            layer_logits = logits[n:].view(len(self.views), n, -1)
            P, (h, w) = self.adapter.tokens_layout(weights[0].shape[-1], size.image_hw)
            maps = []
            for j in range(chosen.shape[1]):
                total = 0
                for slot, a in enumerate(weights):  # each block's own score to its own attention map
                    score = layer_logits[slot].gather(1, chosen[:, j : j + 1]).sum()
                    (grad,) = torch.autograd.grad(score, a, retain_graph=True)
                    total = total + grad.clamp(min=0).mean(dim=1).mean(dim=1)[:, P:]
                maps.append(total.detach())
        return torch.stack(maps, dim=1).view(n, -1, h, w)

    def _head_on_every_layer(self, layer_tokens: List[Optional[Tensor]]) -> HookSet:
        """Hooks that keep each chosen block's tokens and give the head the real output and each block's
        pooled tokens together: the model then returns ``((1 + m) * n, C)`` logits."""
        hooks = HookSet()
        adapter, last = self.adapter, self.adapter.blocks[-1]
        last_view = adapter.block_view(last)

        def keep(slot: int, view: Any) -> Callable[..., None]:
            def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
                layer_tokens[slot] = adapter.layer_tokens(view.unwrap_output(output))

            return hook

        def join(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
            real = adapter.layer_tokens(last_view.unwrap_output(output))
            copies = [self._pooled(t) for t in layer_tokens]  # type: ignore[arg-type]
            joined = torch.cat([real, *copies], dim=0)
            return last_view.wrap_output(output, adapter.layer_output(joined, last_view.unwrap_output(output)))

        for slot, view in enumerate(self.views):
            hooks.forward_hook(view.block, keep(slot, view))
        hooks.forward_hook(last, join)
        return hooks

    def _pooled(self, tokens: Tensor) -> Tensor:
        """``(n, T, D)`` tokens as the head should read them: each token their mean (``"mean"``), or themselves."""
        if self.pooling == "model":
            return tokens
        # every token equal to the mean: any pooling the head does (class token, average) reads the mean
        return tokens.mean(dim=1, keepdim=True).expand_as(tokens)

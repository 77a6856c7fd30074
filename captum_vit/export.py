"""A ViT whose forward returns its logits and its ViT-ReciproCAM maps: exportable.

``LayerReciproCAM`` explains through hooks and Python-side control flow
(chunking, path choice, verification), which ``torch.export``, ONNX and
OpenVINO cannot carry. `ExplainedViT` writes the exact fast path as one
straight-line forward on fixed shapes (the input size is fixed when it is
built), so an inference runtime computes the explanation with the
prediction, at about the cost of one more forward pass.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._utils import agreement_tolerance, check_choice, minmax_normalize, relative_error
from .adapters import HEAD_PREFIX_ONLY, Call, SupportsExport, UnsupportedModelError, find_adapter
from .reciprocam import (
    LayerReciproCAM,
    ReciproCAMOptions,
    SharedProjections,
    mask_levels,
    prefix_block_rows,
    reciprocal_masks,
    score_copies,
)

TARGETS = ("predicted", "all")


class ExplainedViT(nn.Module):
    r"""Logits and ViT-ReciproCAM maps from one forward pass, with no hooks: ready for export.

    ``forward(images)`` returns ``(logits, maps)``: ``(B, C)`` logits and the
    maps of the last block (the exact fast path of `LayerReciproCAM`):
    ``(B, 1, h, w)`` for the predicted class (``targets="predicted"``) or
    ``(B, C, h, w)`` for every class (``targets="all"``), min-max scaled per
    map unless ``normalize=False``. ``forward(images, target)`` with a
    ``(B,)`` long tensor explains the given classes instead.

    Exported graphs have fixed spatial shapes: the grid is taken from
    ``image_size`` when the module is built (the batch may vary).

    Args:
        model: a ViT whose head reads only prefix tokens (class, distillation
            or register tokens), e.g. timm DeiT, distilled DeiT, register ViTs.
        image_size: ``(H, W)`` the model is fed (default: its own input size).
        kernel, keep_prefix_tokens, scores, residual: as
            `LayerReciproCAM.attribute`.
        targets: ``"predicted"`` or ``"all"``.
        normalize: min-max scale each map (``False``: raw scores).

    The construction checks, on one random image, that the maps equal
    ``LayerReciproCAM``'s general path (which runs the model's own modules),
    and refuses the model otherwise.

    Example::

        explained = ExplainedViT(model).eval()
        logits, maps = explained(images)                        # eager
        program = torch.export.export(explained, (images,))     # torch.export
        torch.onnx.export(explained, (images,), "deit_explained.onnx", dynamo=True)
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: Optional[Tuple[int, int]] = None,
        *,
        kernel: str = "gaussian",
        keep_prefix_tokens: bool = True,
        scores: str = "softmax",
        residual: str = "unmasked",
        targets: str = "predicted",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        options = ReciproCAMOptions(kernel=kernel, keep_prefix_tokens=keep_prefix_tokens, scores=scores,
                                    residual=residual)
        options.check()  # the options class LayerReciproCAM and the registry read
        check_choice(targets, "targets", TARGETS)
        adapter = find_adapter(model)
        if not isinstance(adapter, SupportsExport):
            raise UnsupportedModelError(
                f"ExplainedViT cannot write a hook-free forward for {adapter.family} models yet (supported: timm "
                "VisionTransformer and DeiT); explain them with LayerReciproCAM."
            )
        self.model = adapter.model
        self._adapter = adapter
        last = adapter.blocks[-1]
        self._cam = LayerReciproCAM(self.model, last)
        reason = self._cam.fast_path_unavailable_reason()
        if adapter.head_reads != HEAD_PREFIX_ONLY:
            reason = f"it needs a head that reads only prefix tokens, and the head reads {adapter.head_reads}"
        if reason is not None:
            raise UnsupportedModelError(f"ExplainedViT computes the exact fast path, which does not apply: {reason}.")
        self._view = adapter.block_view(last)
        if image_size is None:
            image_size = adapter.default_image_size()
            if image_size is None:
                raise ValueError("give image_size=(H, W): this model does not state its input size.")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grid = adapter.grid_for(self.image_size)
        self.num_prefix_tokens = adapter.num_prefix_tokens
        #: the ViT-ReciproCAM options, as `LayerReciproCAM.attribute` takes them
        self.options = {name: getattr(options, name) for name in ("kernel", "keep_prefix_tokens", "scores", "residual")}
        self.targets = targets
        self.normalize = normalize
        masks = reciprocal_masks(self.grid, self.num_prefix_tokens, kernel, keep_prefix_tokens)
        levels, level_index = mask_levels(masks)  # fixed here, so the forward has no data-dependent step
        self.register_buffer("masks", masks, persistent=False)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("level_index", level_index, persistent=False)
        self._verify()

    def forward(self, images: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(B, 3, H, W)`` images -> ``(B, C)`` logits and ``(B, k, h, w)`` maps (see the class doc)."""
        logits, maps = self._raw(images, target)
        return logits, (minmax_normalize(maps) if self.normalize else maps)

    def trunk(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, T, D)`` the last block's input: the part of the forward that no copy
        reaches, which a runtime may compute in a faster precision than `from_block_input`."""
        return self._adapter.forward_to_block(images, len(self._adapter.blocks) - 1)

    def _raw(self, images: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.from_block_input(self.trunk(images), target)

    def from_block_input(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The last block's input ``(B, T, D)`` -> ``(B, C)`` logits and ``(B, k, h, w)`` raw maps (not scaled)."""
        P, (h, w) = self.num_prefix_tokens, self.grid
        B = x.shape[0]
        view = self._view
        z = view.norm1(x)
        unmasked = view.forward(z, x, Call())[:, :P]  # the block's own output, prefix rows
        shared = SharedProjections(view.math, z, self.levels.to(z.dtype), Call())
        masks = self.masks.to(z.dtype)
        copies = prefix_block_rows(view, x, shared, masks, self.level_index, P, self.options["residual"])
        rows = torch.cat([unmasked[:, None], copies], dim=1)  # (B, 1 + K, P, D)
        logits_all = self._adapter.forward_head_on_prefix(rows.reshape(B * (1 + h * w), P, -1))
        logits_all = logits_all.view(B, 1 + h * w, -1).float()
        logits = logits_all[:, 0]
        values = score_copies(logits_all[:, 1:], self.options["scores"])
        if self.targets == "all" and target is None:
            maps = values.transpose(1, 2)  # (B, C, K)
        else:
            chosen = logits.argmax(-1) if target is None else target
            maps = values.gather(2, chosen.view(B, 1, 1).expand(B, h * w, 1)).transpose(1, 2)  # (B, 1, K)
        return logits, maps.reshape(B, -1, h, w)

    @torch.no_grad()
    def _verify(self) -> None:
        """The explicit forward must equal LayerReciproCAM's general path (raw scores) on a random image."""
        param = next(self.model.parameters())
        image = torch.randn(1, 3, *self.image_size, generator=torch.Generator().manual_seed(0))
        image = image.to(device=param.device, dtype=param.dtype)
        logits, maps = self._raw(image)  # raw scores: min-max scaling would magnify rounding on flat maps
        reference_logits = self.model(image)
        if self.targets == "predicted":
            reference = self._cam.attribute(image, normalize=False, path="general", **self.options)
        else:
            reference = self._cam.attribute_all_classes(image, normalize=False, path="general", **self.options)
        tolerance = agreement_tolerance(param.dtype)
        errors = (relative_error(logits, reference_logits), relative_error(maps, reference))
        if max(errors) > tolerance:
            raise UnsupportedModelError(
                f"ExplainedViT does not reproduce this {type(self.model).__name__}: logits differ by {errors[0]:.2e}, "
                f"maps by {errors[1]:.2e} (relative) from the model's own forward and LayerReciproCAM. A patched "
                "forward or a custom head is the likely cause; explain it with LayerReciproCAM instead."
            )

"""transformers ``SwinModel`` (inside ``SwinForImageClassification``): a grid of tokens per stage.

``model.encoder.layers`` are ``SwinStage``s: ``SwinLayer`` blocks, then a
``SwinPatchMerging`` (all but the last). A ``SwinLayer`` is called as
``layer(hidden_states, input_dimensions)`` on ``(B, h*w, D)`` tokens and
returns ``(hidden_states, attn_weights)``; its norm sits inside its forward,
before the (shifted) window attention:
``x + drop_path(windows(layernorm_before(x)))``, then
``+ dropout(mlp(layernorm_after(.)))``, where ``windows`` pads the grid,
rolls it, partitions it, runs ``attention`` with the shift mask, and
reverses all of it. The pooler averages the last stage's tokens.

`SwinLayerView.attention` composes that branch from the layer's own
methods (``maybe_pad``, ``cyclic_shift``, ``get_attn_mask``, ``attention``,
``dropout``) and transformers' ``window_partition``/``window_reverse``;
ViT-ReciproCAM checks it against the layer's own output before use.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ._attention_math import Call, split_call
from ._base import ViTAdapter
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError, lazy_isinstance
from ._grid import WindowedStages, halved


class SwinLayerView(BlockView):
    """transformers ``SwinLayer``: the input dimensions travel in the call; the output is a tuple."""

    parts = PreNormParts(norm1="layernorm_before", attention="attention", norm2="layernorm_after", drop1="drop_path",
                         drop2="dropout")

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        return split_call(args, kwargs)

    def attention_call(self, call: Call) -> Call:
        return call

    def unwrap_output(self, output: Any) -> Tensor:
        return output[0]

    def wrap_output(self, original: Any, y: Tensor) -> Any:
        return (y, *(None for _ in original[1:]))  # no attention weights for the copies

    def attention(self, z: Tensor, call: Call) -> Tensor:
        from transformers.models.swin.modeling_swin import window_partition, window_reverse

        layer = self.block
        h, w = call.args[0] if call.args else call.kwargs["input_dimensions"]
        N, _, D = z.shape
        grid, _ = layer.maybe_pad(z.view(N, h, w, D), h, w)
        hp, wp, size = grid.shape[1], grid.shape[2], layer.window_size
        windows = window_partition(layer.cyclic_shift(grid), size).view(-1, size * size, D)
        mask = layer.get_attn_mask(hp, wp, dtype=grid.dtype, device=windows.device)
        out = layer.dropout(layer.attention(windows, mask)[0]).view(-1, size, size, D)
        out = layer.cyclic_shift(window_reverse(out, size, hp, wp), reverse=True)
        return out[:, :h, :w].reshape(N, h * w, D)


class HFSwinAdapter(WindowedStages, ViTAdapter):
    """transformers ``SwinModel``: the layers of every stage, in order."""

    family = "transformers SwinModel"
    library = "transformers"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return lazy_isinstance(module, "transformers.models.swin.modeling_swin", ["SwinModel"])

    @property
    def blocks(self) -> List[nn.Module]:
        return [block for stage in self.model.encoder.layers for block in stage.blocks]

    def blocks_expression(self) -> str:
        return "[b for stage in model.swin.encoder.layers for b in stage.blocks]"

    @property
    def image_module(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def stage_grids(self, image_hw: Sequence[int]) -> List[Tuple[int, int]]:
        p = self.image_module.patch_size
        grid = (-(-int(image_hw[0]) // p[0]), -(-int(image_hw[1]) // p[1]))  # the image is padded to whole patches
        grids = []
        for stage in self.model.encoder.layers:
            grids += [grid] * len(stage.blocks)
            grid = grid if stage.downsample is None else halved(grid)
        return grids

    def block_view(self, block: nn.Module) -> BlockView:
        if not lazy_isinstance(block, "transformers.models.swin.modeling_swin", ["SwinLayer"]):
            raise UnsupportedModelError(
                f"Swin block {type(block).__name__} is not supported (supported: transformers' SwinLayer). "
                "Use vit_layer_gradcam on a block's output."
            )
        return SwinLayerView(block)

    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        return [(m, "gradient_checkpointing") for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]

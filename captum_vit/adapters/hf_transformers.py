"""Hugging Face transformers ViTs: ViT, DeiT (with teacher), DINOv2 (with registers), CLIP vision.

transformers 5 writes every one of these attentions the same way
(``q_proj``, ``k_proj``, ``v_proj``, then ``o_proj`` or ``out_proj``, with a
``scaling``/``scale`` attribute), so one `HFAttentionMath` serves them.
The layouts differ only in names:

=====================================  =======  ==========================================
model class                            prefix   the head reads
=====================================  =======  ==========================================
ViTForImageClassification              1        the class token
DeiTForImageClassification             2        the class token
DeiTForImageClassificationWithTeacher  2        class and distillation tokens (averaged)
Dinov2ForImageClassification           1        class token and the mean of patch tokens
Dinov2WithRegistersForImageClassif.    1 + r    class token and the mean of patch tokens
CLIPForImageClassification             1        the mean of patch tokens
CLIPVisionModel(WithProjection),       as the   unknown: a head of the user's reads
ViTModel, DeiTModel, Dinov2Model       model    ``pooler_output`` or the tokens
=====================================  =======  ==========================================
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ._attention_math import AttentionMath, Call, KeyValueMaps
from ._base import HEAD_CLASS_AND_PATCHES, HEAD_PATCHES_ONLY, HEAD_PREFIX_ONLY, HEAD_UNKNOWN, ViTAdapter
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError, lazy_isinstance

#: classification model -> what its head reads
_CLASSIFIERS = {
    "ViTForImageClassification": HEAD_PREFIX_ONLY,
    "DeiTForImageClassification": HEAD_PREFIX_ONLY,
    "DeiTForImageClassificationWithTeacher": HEAD_PREFIX_ONLY,
    "Dinov2ForImageClassification": HEAD_CLASS_AND_PATCHES,
    "Dinov2WithRegistersForImageClassification": HEAD_CLASS_AND_PATCHES,
    "CLIPForImageClassification": HEAD_PATCHES_ONLY,
}
#: backbones whose output a user's own head reads
_BACKBONES = ("ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel", "CLIPVisionModel",
              "CLIPVisionModelWithProjection", "CLIPVisionTransformer")
_LAYERS = ("ViTLayer", "DeiTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer", "CLIPEncoderLayer")


def _hf_class(module: nn.Module, names: Sequence[str]) -> bool:
    return type(module).__module__.startswith("transformers.") and type(module).__name__ in names


class HFAttentionMath(AttentionMath):
    """transformers 5 self-attention: ``q_proj``/``k_proj``/``v_proj`` -> softmax -> ``o_proj``."""

    finish_reads_input = False

    def __init__(self, module: nn.Module) -> None:
        heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads")
        scale = getattr(module, "scaling", None) or getattr(module, "scale")
        super().__init__(module, heads, module.head_dim, scale)
        self.out_proj = getattr(module, "o_proj", None) or getattr(module, "out_proj")

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        if rest:  # attention_mask given positionally
            kwargs["attention_mask"], rest = rest[0], rest[1:]
        return x, Call(tuple(rest), kwargs)

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        return self.split_heads(m.q_proj(x)), self.split_heads(m.k_proj(x)), self.split_heads(m.v_proj(x))

    def key_value_maps(self, call: Call) -> Optional[KeyValueMaps]:
        key, value = self.module.k_proj, self.module.v_proj
        if type(key) is not nn.Linear or type(value) is not nn.Linear:
            return None
        H, d = self.num_heads, self.head_dim
        return KeyValueMaps(key.weight.view(H, d, -1), value.weight.view(H, d, -1),
                            None if value.bias is None else value.bias.view(H, d))

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        return self.out_proj(merged)

    def wrap_output(self, original: Any, out: Tensor) -> Any:
        return (out, *original[1:]) if isinstance(original, tuple) else out

    def unwrap_output(self, output: Any) -> Tensor:
        return output[0] if isinstance(output, tuple) else output


def _layer_parts(block: nn.Module) -> PreNormParts:
    """The parts of a ``Dinov2Layer`` (layer scales, drop path), a ``ViTLayer``/``DeiTLayer`` (dropout as the
    only scale) or a ``CLIPEncoderLayer``."""
    if hasattr(block, "layer_scale1"):
        return PreNormParts(attention="attention", scale1="layer_scale1", scale2="layer_scale2", drop1="drop_path",
                            drop2="drop_path")
    if hasattr(block, "layernorm_before"):
        drop = "dropout" if hasattr(block, "dropout") else None
        return PreNormParts(norm1="layernorm_before", attention="attention", norm2="layernorm_after", drop1=drop,
                            drop2=drop)
    return PreNormParts(norm1="layer_norm1", attention="self_attn", norm2="layer_norm2")


class HFLayerView(BlockView):
    """``ViTLayer``/``DeiTLayer``, ``Dinov2Layer``, ``CLIPEncoderLayer`` (`_layer_parts`)."""

    def __init__(self, block: nn.Module) -> None:
        parts = _layer_parts(block)
        super().__init__(block, HFAttentionMath(getattr(block, parts.attention)), parts)

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        return self.math.read_call(args, kwargs)  # layers and their attention take the same call

    def attention_call(self, call: Call) -> Call:
        return call

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.attention_module(z, *call.args, **call.kwargs)[0]


class HFViTAdapter(ViTAdapter):
    """transformers ViT, DeiT, DINOv2 and CLIP vision models (see the module table)."""

    family = "transformers ViT/DeiT/DINOv2/CLIP"
    library = "transformers"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if not lazy_isinstance(module, "transformers", ["PreTrainedModel"]):
            return _hf_class(module, ("CLIPVisionTransformer",))
        return _hf_class(module, tuple(_CLASSIFIERS) + _BACKBONES)

    def __init__(self, model: nn.Module) -> None:
        import transformers

        major = int(transformers.__version__.split(".")[0])
        if major < 5:  # 4.x names the projections query/key/value inside nested attention modules
            raise UnsupportedModelError(
                f"transformers {transformers.__version__} is installed; captum_vit reads the attention layout "
                "of transformers 5 (q_proj/k_proj/v_proj). Upgrade: pip install 'transformers>=5'."
            )
        super().__init__(model)
        self.backbone = next(m for m in model.modules() if hasattr(m, "embeddings") and _layers_of(m))
        self._blocks = _layers_of(self.backbone)
        config = getattr(model, "config", None) or self.backbone.config
        self.config = getattr(config, "vision_config", config)

    @property
    def blocks(self) -> List[nn.Module]:
        return list(self._blocks)

    @property
    def num_prefix_tokens(self) -> int:
        emb = self.backbone.embeddings
        count = 1 + (getattr(emb, "distillation_token", None) is not None)
        registers = getattr(emb, "register_tokens", None)
        return count + (registers.shape[1] if registers is not None else 0)

    @property
    def image_module(self) -> nn.Module:
        return self.backbone.embeddings

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        p = self.config.patch_size
        ph, pw = (p, p) if isinstance(p, int) else p
        return int(image_hw[0]) // ph, int(image_hw[1]) // pw

    @property
    def head_reads(self) -> str:
        return _CLASSIFIERS.get(type(self.model).__name__, HEAD_UNKNOWN)

    def block_view(self, block: nn.Module) -> BlockView:
        if not _hf_class(block, _LAYERS):
            raise UnsupportedModelError(f"transformers layer {type(block).__name__} is not one of {', '.join(_LAYERS)}.")
        return HFLayerView(block)

    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        return [(b, "gradient_checkpointing") for b in self._blocks if getattr(b, "gradient_checkpointing", False)]


def _layers_of(module: nn.Module) -> List[nn.Module]:
    for holder in (module, getattr(module, "encoder", None)):
        for name in ("layers", "layer"):
            layers = getattr(holder, name, None) if holder is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) and _hf_class(layers[0], _LAYERS):
                return list(layers)
    return []

"""What each kind of layer is to a relevance rule, over every supported library.

AttnLRP gives each layer outside the attention a rule by what the layer
computes; this table is the one place that knows which classes of torch,
timm, transformers, open_clip and torchvision compute what.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ._errors import lazy_isinstance

#: a linear or convolutional layer: LRP's gamma rule
ROLE_WEIGHTED = "weighted"
#: a layer norm: the identity rule (the standard deviation is a constant)
ROLE_NORM = "norm"
#: an element-wise activation: the identity rule
ROLE_ACTIVATION = "activation"
#: linear in its input or constant in eval mode (dropout, layer scale, pooling, position tables): plain gradient
ROLE_LINEAR = "linear"

_LINEAR = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Embedding, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
)
_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish)
_LIBRARY_CLASSES = {
    ROLE_LINEAR: [
        ("timm.layers", ["DropPath", "LayerScale", "LayerScale2d", "FastAdaptiveAvgPool", "RotaryEmbeddingCat",
                         "RotaryEmbedding", "RelPosBias", "RelPosMlp"]),
        ("timm.models.vision_transformer_relpos", ["RelPosBias", "RelPosMlp"]),
        ("timm.models.beit", ["RelativePositionBias"]),
        ("open_clip.transformer", ["LayerScale"]),
        ("torchvision.ops", ["StochasticDepth", "Permute"]),
        ("torchvision.ops.misc", ["Permute"]),
        ("transformers.models.dinov2.modeling_dinov2", ["Dinov2LayerScale", "Dinov2DropPath"]),
        ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
         ["Dinov2WithRegistersLayerScale", "Dinov2WithRegistersDropPath"]),
        ("transformers.models.swin.modeling_swin", ["SwinDropPath"]),
    ],
    ROLE_ACTIVATION: [
        ("transformers.activations", ["GELUActivation", "QuickGELUActivation", "NewGELUActivation",
                                      "FastGELUActivation", "GELUTanh", "SiLUActivation"]),
        ("open_clip.transformer", ["QuickGELU"]),
    ],
}
#: gated MLPs multiply two branches: their product needs the uniform rule, which hooks from outside cannot apply
_GATED_MLPS = [
    ("timm.layers", ["SwiGLU", "SwiGLUPacked", "GluMlp"]),
    ("transformers.models.dinov2.modeling_dinov2", ["Dinov2SwiGLUFFN"]),
]


def relevance_role(module: nn.Module) -> Optional[str]:
    """The rule a leaf layer takes (``ROLE_*``), or ``None`` for a layer no rule covers."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return ROLE_WEIGHTED
    if isinstance(module, nn.LayerNorm):
        return ROLE_NORM if len(module.normalized_shape) == 1 else None
    if isinstance(module, _ACTIVATIONS):
        return ROLE_ACTIVATION
    if isinstance(module, _LINEAR):
        return ROLE_LINEAR
    for role, places in _LIBRARY_CLASSES.items():
        if any(lazy_isinstance(module, path, names) for path, names in places):
            return role
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    """A gated MLP (SwiGLU and kin), whose branch product no per-layer rule covers."""
    return any(lazy_isinstance(module, path, names) for path, names in _GATED_MLPS)

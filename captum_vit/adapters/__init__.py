"""One adapter per Vision Transformer family; the only code that knows a model's layout.

`find_adapter` finds the ViT behind a ``forward_func`` (unwrapping
``torch.compile``, ``DataParallel`` and wrapper modules) and returns the
adapter of its family; every explainer asks it, and nothing else reads a
model's internals. Adding a family is one file here plus a line in
`ADAPTERS`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Optional, Tuple, Type

import torch
from torch import nn

from .._utils import module_of
from ._attention_math import AttentionMath, Call, GradientRule, KeyValueMaps, merge_heads, split_call, split_heads
from ._base import HEAD_CLASS_AND_PATCHES, HEAD_PATCHES_ONLY, HEAD_PREFIX_ONLY, HEAD_UNKNOWN, ViTAdapter
from ._block_view import BlockView, MlpEntry, PreNormParts
from ._capabilities import EntersCopiesEarly, LRPBlock, LRPHead, RefusesAttentionMethods, SupportsExport, SupportsLRP
from ._errors import UnsupportedModelError
from ._roles import ROLE_ACTIVATION, ROLE_LINEAR, ROLE_NORM, ROLE_WEIGHTED, is_gated_mlp, relevance_role
from .hf_swin import HFSwinAdapter
from .hf_transformers import HFViTAdapter
from .open_clip_vit import OpenClipViTAdapter
from .timm_beit import TimmBeitAdapter
from .timm_cait import TimmCaitAdapter
from .timm_eva import TimmEvaAdapter
from .timm_pit import TimmPitAdapter
from .timm_relpos import TimmRelPosViTAdapter
from .timm_swin import TimmSwinAdapter
from .timm_vit import TimmNaFlexViTAdapter, TimmViTAdapter
from .timm_xcit import TimmXcitAdapter
from .torchvision_swin import TorchvisionSwinAdapter
from .torchvision_vit import TorchvisionViTAdapter

__all__ = [
    "ADAPTERS", "AttentionMath", "BlockView", "Call", "EntersCopiesEarly", "GradientRule", "KeyValueMaps", "LRPBlock", "LRPHead", "MlpEntry", "PreNormParts", "HEAD_CLASS_AND_PATCHES", "HEAD_PATCHES_ONLY",
    "HEAD_PREFIX_ONLY", "HEAD_UNKNOWN", "RefusesAttentionMethods", "SupportsExport", "SupportsLRP", "UnsupportedModelError", "ViTAdapter", "check_runtime",
    "eager_forward_func", "find_adapter", "is_gated_mlp", "merge_heads", "relevance_role", "split_call", "split_heads",
    "supported_families", "ROLE_ACTIVATION", "ROLE_LINEAR", "ROLE_NORM", "ROLE_WEIGHTED",
]

#: Every family, most specific first.
ADAPTERS: Tuple[Type[ViTAdapter], ...] = (
    TimmNaFlexViTAdapter,
    TimmViTAdapter,
    TimmEvaAdapter,
    TimmBeitAdapter,
    TimmRelPosViTAdapter,
    TimmSwinAdapter,
    TimmCaitAdapter,
    TimmXcitAdapter,
    TimmPitAdapter,
    TorchvisionViTAdapter,
    TorchvisionSwinAdapter,
    HFViTAdapter,
    HFSwinAdapter,
    OpenClipViTAdapter,
)

#: Class-name fragments of windowed or hierarchical vision transformers that no adapter knows (Swin v1 has
#: adapters; Swin v2 normalises after attention, so no masked normalised input feeds its attention).
_WINDOWED = ("swin", "maxvit", "hiera", "mvit", "twins", "pvt", "coat", "nest", "davit", "efficientformer")


def supported_families() -> str:
    return ", ".join(a.family for a in ADAPTERS)


def _compiled_type() -> Optional[type]:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - torch without dynamo
        return None
    return OptimizedModule


def _unwrap(module: Any) -> Any:
    """The module that does the work: past ``torch.compile`` and (Distributed)DataParallel."""
    compiled = _compiled_type()
    while True:
        if compiled is not None and isinstance(module, compiled):
            module = module._orig_mod
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def eager_forward_func(forward_func: Callable[..., Any]) -> Callable[..., Any]:
    """``forward_func`` itself, or the eager module behind a ``torch.compile``'d one.

    Compiled graphs do not run forward hooks added after compilation, and
    explanations need hooks; the eager module computes the same function.
    A compiled module nested inside a wrapper cannot be swapped, so it is refused.
    """
    compiled = _compiled_type()
    if compiled is not None and isinstance(forward_func, compiled):
        forward_func = forward_func._orig_mod
    root = module_of(forward_func)
    if compiled is not None and isinstance(root, nn.Module):
        for name, sub in root.named_modules():
            if isinstance(sub, compiled):
                raise UnsupportedModelError(
                    f"{name} inside {type(root).__name__} is compiled with torch.compile; explanations hook the "
                    "model's blocks, which compiled code does not run. Build the wrapper around the uncompiled "
                    f"module ({name}._orig_mod), or pass the compiled model itself (it is unwrapped)."
                )
    return forward_func


def _owner(forward_func: Any) -> Optional[nn.Module]:
    owner = module_of(forward_func)
    return _unwrap(owner) if isinstance(owner, nn.Module) else None


def _adapters_in(root: nn.Module) -> List[ViTAdapter]:
    found: List[ViTAdapter] = []
    for module in root.modules():  # outermost first: a classifier before its backbone
        for cls in ADAPTERS:
            if cls.matches(module):
                found.append(cls(module))
                break
    return found


def find_adapter(
    forward_func: Callable[..., Any], layer: Optional[nn.Module] = None, vit: Optional[nn.Module] = None
) -> ViTAdapter:
    """The adapter of the ViT behind ``forward_func`` (and holding ``layer``).

    Args:
        forward_func: the model, a module containing it (a wrapper that
            normalises or resizes), a compiled or DataParallel model, or a
            bound method of any of these.
        layer: a block the caller will explain; the ViT must hold it.
        vit: the model, when ``forward_func`` is a plain function.

    Raises:
        UnsupportedModelError: naming the class found, the supported families
            and what to do.
    """
    if vit is not None and not isinstance(vit, nn.Module):
        raise TypeError(
            f"vit must be the torch module that holds the ViT (e.g. vit=model); got {type(vit).__name__} {vit!r}. "
            "To load a model by name, use captum_vit.models.load_model(name).vit."
        )
    root = _unwrap(vit) if vit is not None else _owner(forward_func)
    if root is None:
        raise UnsupportedModelError(
            f"forward_func is a {type(forward_func).__name__}, not a torch module, so the Vision Transformer "
            "inside it cannot be found; pass the model as well, e.g. LayerReciproCAM(fn, layer, vit=model)."
        )
    candidates = _adapters_in(root)
    if not candidates:
        raise UnsupportedModelError(_not_found_message(root))
    if layer is not None:
        holding = [a for a in candidates if any(b is layer for b in a.blocks)]
        if not holding:
            candidates[0].block_index(layer)  # raises with advice on which blocks to pass
        candidates = holding
    return candidates[0]


def _not_found_message(root: nn.Module) -> str:
    name = type(root).__name__
    windowed = [type(m).__name__ for m in root.modules() if any(w in type(m).__name__.lower() for w in _WINDOWED)]
    if windowed:
        return (
            f"{windowed[0]} is a windowed or hierarchical vision transformer that captum_vit does not know (of "
            "these, Swin v1 is supported: timm SwinTransformer, torchvision swin_t/s/b, transformers SwinModel; Swin v2 normalises after "
            "attention, so no masked normalised input feeds it). Supported families: "
            f"{supported_families()}. Captum's LayerGradCam on a stage's output works on any model."
        )
    return (
        f"no supported Vision Transformer was found in {name}. Supported families: {supported_families()}. "
        "If the model is one of these behind a plain function, pass it as vit=model."
    )


def check_runtime(adapter: ViTAdapter, who: str, needs_gradients: bool) -> None:
    """Refuse or warn about the state a call finds the model and torch in."""
    if needs_gradients and torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{who} needs gradients, which torch.inference_mode() forbids; call it outside inference_mode "
            f"(under torch.no_grad() it works: {who} enables gradients for itself)."
        )
    reason = adapter.unsupported_state()
    if reason is not None:
        raise UnsupportedModelError(f"{type(adapter.model).__name__}: {reason}.")
    if any(m.training for m in adapter.model.modules()):
        warnings.warn(
            f"the model is in training mode: dropout makes {who} maps random. Call model.eval() first.",
            stacklevel=4,
        )

"""Shared fixtures: small randomly initialised timm ViTs and a model-state snapshot.

Parameters are re-drawn (biases and norm weights included) so that every term
of the methods matters: timm's own init leaves biases at zero, which would let
a wrong bias treatment pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

SHARED = Path(os.environ.get("CAPTUM_VIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "gamma" in name:  # layer scale
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def _small_vit(**kw) -> VisionTransformer:
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=10, qkv_bias=True)
    args.update(kw)
    return VisionTransformer(**args)


def _gated(model: VisionTransformer) -> VisionTransformer:
    for blk in model.blocks:
        blk.attn = Attention(64, num_heads=4, qkv_bias=True, gated=True)
    return model


#: name -> (factory, input size (H, W))
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int]]] = {
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=112), (112, 112)),
    "deit_tiny_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=112),
        (112, 112),
    ),
    "vit_reg4": (lambda: _small_vit(reg_tokens=4), (64, 64)),
    "vit_avgpool": (lambda: _small_vit(global_pool="avg"), (64, 64)),
    "vit_nonsquare": (lambda: _small_vit(img_size=(48, 80), dynamic_img_size=True), (48, 96)),
    "vit_qknorm_layerscale": (lambda: _small_vit(qk_norm=True, init_values=0.1, scale_attn_norm=True), (64, 64)),
    "vit_gated": (lambda: _gated(_small_vit()), (64, 64)),
}


def make_model(name: str, seed: int = 0) -> Tuple[nn.Module, torch.Tensor]:
    factory, (H, W) = MODELS[name]
    torch.manual_seed(seed)
    model = randomize(factory(), seed)
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(seed + 1))
    return model, images


@pytest.fixture(scope="session")
def deit_tiny_224():
    torch.manual_seed(0)
    return randomize(timm.create_model("deit_tiny_patch16_224", num_classes=10))


def model_state(model: nn.Module) -> dict:
    """Everything an explainer must leave as it found it."""
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
                len(getattr(m, "_forward_hooks_with_kwargs", {})),
            )
            for n, m in model.named_modules()
        },
        "fused_attn": {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")},
        "grad_enabled": torch.is_grad_enabled(),
        "params": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "hooks", "fused_attn", "grad_enabled"):
        assert before[key] == after[key], f"{key} changed"
    assert before["params"].keys() == after["params"].keys()
    for n, t in before["params"].items():
        assert torch.equal(t, after["params"][n]), f"parameter {n} changed"
    assert before["grads"].keys() == after["grads"].keys(), "gradients were left on parameters"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (set CAPTUM_VIT_SHARED)")
    return path

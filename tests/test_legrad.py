"""LeGrad against the maps its authors' code produced, a literal re-statement on timm, and every family.

``tests/data/legrad_reference.pt`` holds what LeGrad's repository (github
``WalBouss/LeGrad`` at a9edb03, run unedited with open_clip_torch 2.23.0 by
``benchmarks/legrad_reference.py``) computed on a small open_clip CLIP with
random weights: ``compute_legrad_clip`` for three prompts, two images, with
its default ``layer_index=-2`` and with ``layer_index=0``. Their code only
explains open_clip models; on timm, the literal re-statement below is the
reference.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, model_state
from families import FAMILIES, build

from captum_vit import LeGrad
from captum_vit.adapters import UnsupportedModelError

DATA = Path(__file__).resolve().parent / "data" / "legrad_reference.pt"


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA)


@pytest.fixture(scope="module")
def zero_shot(reference):
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    from captum_vit.clip import ZeroShotClassifier

    visual = VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=2.0,
                               ls_init_value=0.5, output_dim=32)
    visual.load_state_dict(reference["visual/state"])
    # their score is the cosine similarity; the classifier's logit scale 1 makes the logits exactly that
    return ZeroShotClassifier(visual.eval(), reference["text_embedding"], logit_scale=1.0)


def _as_theirs(maps: torch.Tensor) -> torch.Tensor:
    """Their output form: upsampled 16x bilinearly, then min-max scaled per map."""
    up = F.interpolate(maps, scale_factor=16, mode="bilinear")
    lo = up.flatten(2).min(-1).values[..., None, None]
    hi = up.flatten(2).max(-1).values[..., None, None]
    return (up - lo) / (hi - lo)


#: their layer_index -> our layers
LAYERS = {-2: (-2, -1), 0: None}


@pytest.mark.parametrize("layer_index", [-2, 0])
def test_equals_the_authors_code_on_open_clip(reference, zero_shot, layer_index):
    before = model_state(zero_shot)
    method = LeGrad(zero_shot, layers=LAYERS[layer_index])
    maps = method.attribute(reference["images"], target=torch.tensor([[0, 1, 2]] * 2), normalize=False)
    assert maps.shape == (2, 3, 4, 4)
    # float32 rounding of the same sums (their maps are min-max scaled to [0, 1])
    torch.testing.assert_close(_as_theirs(maps), reference[f"maps/{layer_index}"], atol=1e-5, rtol=0)
    assert_same_state(before, model_state(zero_shot))


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    from families import randomize

    return randomize(VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4,
                                       num_classes=10, qkv_bias=True), seed=3)


def literal_legrad(model, image, target, layers, pooling):
    """One image, every step written out with timm's own sub-modules."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
    total = 0
    for i, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).reshape(1, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        out = attn.proj((a @ v).transpose(1, 2).reshape(1, -1, attn.num_heads * attn.head_dim))
        x = x + block.ls1(out)
        x = x + block.ls2(block.mlp(block.norm2(x)))
        if i not in layers:
            continue
        pooled = x.mean(1) if pooling == "mean" else x[:, 0]
        score = model.head(model.fc_norm(model.norm(pooled)))[0, target]
        (grad,) = torch.autograd.grad(score, a, retain_graph=True)
        total = total + grad.clamp(min=0).mean(1).mean(1)[0, 1:]
    return total.view(4, 4)


@pytest.mark.parametrize("pooling", ["mean", "model"])
def test_equals_literal_restatement_on_timm(pooling):
    model = _timm_vit()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = LeGrad(model, layers=[0, 2], pooling=pooling).attribute(images, target=[3, 7], normalize=False)
    for b, t in enumerate([3, 7]):
        torch.testing.assert_close(maps[b, 0], literal_legrad(model, images[b], t, {0, 2}, pooling),
                                   rtol=1e-5, atol=1e-7)


def test_batches_chunks_dtypes_and_options():
    model = _timm_vit()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = LeGrad(model).attribute(images, target=[1, 2, 3], normalize=False)
    one = torch.cat([LeGrad(model).attribute(images[i : i + 1], target=[i + 1], normalize=False) for i in range(3)])
    torch.testing.assert_close(maps, one, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(maps, LeGrad(model).attribute(images, target=[1, 2, 3], normalize=False,
                                                             batch_size=2), rtol=1e-5, atol=1e-8)
    f64 = LeGrad(copy.deepcopy(model).double()).attribute(images.double(), target=[1, 2, 3], normalize=False)
    assert f64.dtype == torch.float32
    torch.testing.assert_close(f64, maps, rtol=1e-4, atol=1e-6)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    before = model_state(bf16_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = LeGrad(bf16_model).attribute(images.to(torch.bfloat16), target=[1, 2, 3], normalize=False)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert_same_state(before, model_state(bf16_model))
    with pytest.raises(ValueError, match="pooling"):
        LeGrad(model, pooling="cls")
    with pytest.raises(ValueError, match="out of range"):
        LeGrad(model, layers=[5])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        LeGrad(model).attribute(images)


#: families whose attention the adapters expose and whose blocks' output the head reads
REFUSED = {
    "timm CaiT (class attention after the blocks)", "timm XCiT (cross-covariance attention)",
    "timm PiT (the grid pooled between stages)", "timm Swin (two stages, shifted windows)",
    "torchvision Swin (two stages, shifted windows)",
    "transformers SwinForImageClassification (two stages, shifted windows)",
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_works_or_is_refused_clearly(name):
    pytest.importorskip(FAMILIES[name][2])
    model, _, images = build(name)
    before = model_state(model)
    if name in REFUSED:
        with pytest.raises(UnsupportedModelError, match="LayerReciproCAM"):
            LeGrad(model)
        assert_same_state(before, model_state(model))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may give flat maps
        maps = LeGrad(model).attribute(images, target=[3, 7], normalize=False)
        single = LeGrad(model).attribute(images[1:], target=[7], normalize=False)
    assert maps.shape[:2] == (2, 1) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps[1:], single, rtol=1e-4, atol=1e-7)
    assert_same_state(before, model_state(model))

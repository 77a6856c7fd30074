"""LayerReciproCAM: exactness against a literal per-copy reference, both paths."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from timm.layers import Attention
from families import literal_masks, literal_residual  # masks and residuals written out

from captum_vit import LayerReciproCAM
from captum_vit.reciprocam import reciprocal_masks

RESIDUALS = ("unmasked", "normalized", "input")


def literal_reciprocam(model, block_index, image, kernel, keep_prefix, scores, residual="unmasked"):
    """One image, one masked copy at a time, through timm's own sub-modules."""
    with torch.no_grad():
        x = model.patch_embed(image[None])
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        for blk in model.blocks[:block_index]:
            x = blk(x)
        block = model.blocks[block_index]
        P = model.num_prefix_tokens
        h, w = model.patch_embed.dynamic_feat_size(tuple(image.shape[-2:]))
        z = block.norm1(x)[0]
        out = []
        for mask in literal_masks(h, w, P, kernel, keep_prefix):
            zk = (z * mask[:, None])[None]
            y = literal_residual(x, zk, mask, residual) + block.ls1(block.attn(zk))
            y = y + block.ls2(block.mlp(block.norm2(y)))
            for later in model.blocks[block_index + 1 :]:
                y = later(y)
            logits = model.forward_head(model.norm(y))[0]
            out.append(logits.softmax(-1) if scores == "softmax" else logits)
        return torch.stack(out).T.reshape(-1, h, w)  # (C, h, w)


ALL_MODELS = ["deit_tiny", "deit_tiny_distilled", "vit_reg4", "vit_avgpool", "vit_nonsquare"]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("block", ["last", "earlier"])
def test_general_path_equals_literal_reference(name, block):
    model, images = make_model(name)
    index = len(model.blocks) - 1 if block == "last" else len(model.blocks) - 3
    explainer = LayerReciproCAM(model, model.blocks[index])
    targets = torch.tensor([3, 7])
    for residual in RESIDUALS:
        for kernel in ("gaussian", "dirac"):
            for keep_prefix in (True, False):
                scores = "logits" if keep_prefix else "softmax"
                got = explainer.attribute(
                    images, target=targets, kernel=kernel, keep_prefix_tokens=keep_prefix, residual=residual,
                    scores=scores, normalize=False, path="general", batch_size=37,
                )
                for b in range(images.shape[0]):
                    ref = literal_reciprocam(model, index, images[b], kernel, keep_prefix, scores, residual)
                    torch.testing.assert_close(got[b, 0], ref[targets[b]], atol=1e-5, rtol=1e-5)


FAST_MODELS = ["deit_tiny", "deit_tiny_distilled", "vit_reg4", "vit_avgpool", "vit_nonsquare",
               "vit_qknorm_layerscale", "vit_gated"]


@pytest.mark.parametrize("name", FAST_MODELS)
@pytest.mark.parametrize("block", [-1, -2, -3])
def test_fast_path_equals_general_path(name, block):
    model, images = make_model(name)
    explainer = LayerReciproCAM(model, model.blocks[block])
    assert explainer.fast_path_unavailable_reason() is None
    for residual in RESIDUALS:
        for kernel in ("gaussian", "dirac"):
            for keep_prefix in (True, False):
                kw = dict(kernel=kernel, keep_prefix_tokens=keep_prefix, scores="logits", normalize=False,
                          residual=residual)
                fast = explainer.attribute_all_classes(images, path="fast", batch_size=23, **kw)
                general = explainer.attribute_all_classes(images, path="general", **kw)
                torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-5)


def test_fast_path_matches_literal_reference_at_224(deit_tiny_224):
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    for block in (11, 10):  # the last block, and the authors' second-last one
        explainer = LayerReciproCAM(deit_tiny_224, deit_tiny_224.blocks[block])
        got = explainer.attribute(images, target=4, normalize=False, path="auto")
        assert explainer.last_path == "fast"
        ref = literal_reciprocam(deit_tiny_224, block, images[0], "gaussian", True, "softmax")[4]
        assert got.shape == (1, 1, 14, 14)
        torch.testing.assert_close(got[0, 0], ref, atol=1e-5, rtol=1e-5)


class _OwnAttention(Attention):
    """A subclass of timm's Attention: it may compute anything, so captum_vit has no explicit form of it."""


def test_fallback_is_taken_where_the_fast_path_has_no_explicit_attention():
    model, images = make_model("deit_tiny")
    own = _OwnAttention(192, num_heads=3, qkv_bias=True)
    own.load_state_dict(model.blocks[-2].attn.state_dict())
    model.blocks[-2].attn = own.eval()
    explainer = LayerReciproCAM(model, model.blocks[-2])
    assert "_OwnAttention has no explicit form" in explainer.fast_path_unavailable_reason()
    with pytest.raises(ValueError, match="not exact"):
        explainer.attribute(images, path="fast")
    auto = explainer.attribute(images, path="auto", normalize=False)
    assert explainer.last_path == "general"
    torch.testing.assert_close(auto, explainer.attribute(images, path="general", normalize=False))


@pytest.mark.parametrize("block", [-1, -2])
def test_auto_falls_back_when_forward_func_reads_patch_tokens(block):
    model, images = make_model("deit_tiny")

    def mean_token_head(x):  # reads every token after the last block
        return model.head(model.forward_features(x).mean(dim=1))

    explainer = LayerReciproCAM(mean_token_head, model.blocks[block], vit=model)
    with pytest.warns(UserWarning, match="fast path not used: forward_func's output depends on patch tokens"):
        auto = explainer.attribute(images, target=1, normalize=False)
    assert explainer.last_path == "general"
    general = explainer.attribute(images, target=1, normalize=False, path="general")
    torch.testing.assert_close(auto, general)
    with pytest.raises(ValueError, match="not exact"):
        explainer.attribute(images, path="fast")


def test_masks_match_literal_masks():
    for kernel in ("gaussian", "dirac"):
        for keep in (True, False):
            torch.testing.assert_close(
                reciprocal_masks((3, 5), 2, kernel, keep), literal_masks(3, 5, 2, kernel, keep), atol=0, rtol=0
            )
    centre = reciprocal_masks((3, 3), 1)[4]
    assert centre[1 + 4] == 0.25 and centre.sum() == 2.0  # not renormalised; prefix weight 1


def test_normalized_maps_are_min_max_scaled():
    model, images = make_model("vit_reg4")
    explainer = LayerReciproCAM(model, model.blocks[-1])
    raw = explainer.attribute(images, target=2, normalize=False)
    maps = explainer.attribute(images, target=2)
    flat = raw.flatten(1)
    expected = (flat - flat.min(1, keepdim=True).values) / (
        flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values + 1e-12
    )
    torch.testing.assert_close(maps.flatten(1), expected)
    assert maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("path", ["general", "fast"])
def test_chunking_does_not_change_results(path):
    model, images = make_model("deit_tiny")
    explainer = LayerReciproCAM(model, model.blocks[-2])
    whole = explainer.attribute(images, target=[1, 2], normalize=False, batch_size=10_000, path=path)
    for size in (1, 7, 50, 51):
        chunked = explainer.attribute(images, target=[1, 2], normalize=False, batch_size=size, path=path)
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_all_classes_and_2d_targets_from_one_pass():
    model, images = make_model("deit_tiny_distilled")
    explainer = LayerReciproCAM(model, model.blocks[-1])
    every = explainer.attribute_all_classes(images, normalize=False)
    assert every.shape == (2, 10, 7, 7)
    several = explainer.attribute(images, target=torch.tensor([[0, 9, 4], [2, 2, 5]]), normalize=False)
    assert several.shape == (2, 3, 7, 7)
    torch.testing.assert_close(several[0], every[0, [0, 9, 4]])
    torch.testing.assert_close(several[1], every[1, [2, 2, 5]])
    predicted = model(images).argmax(1)
    default = explainer.attribute(images, normalize=False)
    torch.testing.assert_close(default[:, 0], every[torch.arange(2), predicted])


def test_fast_path_chunks_inside_the_block_and_runs_the_blocks_before_once_per_batch():
    # at the last block only the copies' prefix rows leave it: the whole batch shares one pass of the blocks
    # before (one image per pass made it 1.5x a forward instead of 1.2x on DeiT-S), at most batch_size images
    model, images = make_model("deit_tiny")
    explainer = LayerReciproCAM(model, model.blocks[-1])
    whole = explainer.attribute(images, target=[1, 2], normalize=False, path="fast")  # also proves the fast path
    rows_seen = []
    handle = model.blocks[-2].register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[0]))
    try:
        for size, passes in ((None, [2]), (1, [1, 1]), (3, [2]), (49, [2]), (50, [2])):
            rows_seen.clear()
            chunked = explainer.attribute(images, target=[1, 2], normalize=False, path="fast", batch_size=size)
            assert explainer.last_path == "fast"
            torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
            assert rows_seen == passes, f"batch_size={size}: the blocks before ran {rows_seen}"
    finally:
        handle.remove()


@pytest.mark.parametrize("residual", ["input", "normalized"])
def test_masked_residual_copies_cross_the_later_blocks_as_their_distinct_rows(monkeypatch, residual):
    """With a masked residual an early block's copies go through every later block as their few distinct
    rows (compressed_block), and equal the general path, which runs the model's own blocks on every copy."""
    import sys

    strategies = sys.modules["captum_vit.reciprocam._strategies"]
    calls = []
    compressed = strategies.compressed_block

    def counted(view, y, log_count, call):
        calls.append(tuple(y.shape))
        return compressed(view, y, log_count, call)

    monkeypatch.setattr(strategies, "compressed_block", counted)
    model, images = make_model("deit_tiny")
    cam = LayerReciproCAM(model, model.blocks[0])
    targets = torch.tensor([1, 2])
    fast = cam.attribute(images, target=targets, normalize=False, residual=residual, path="fast")
    general = cam.attribute(images, target=targets, normalize=False, residual=residual, path="general")
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-5)
    later = len(model.blocks) - 1
    assert calls and len(calls) % later == 0
    T = images.shape[-1] // 16 * images.shape[-2] // 16 + 1
    assert all(rows < T // 2 for _, rows, _ in calls), calls  # a few rows per copy, not all T

"""Every supported family x every method x {last block, an earlier block}, against literal references."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_same_state, model_state
from families import (
    CLASS_ATTENTION,
    FAMILIES,
    PATCH_POOLED,
    POOLED_STAGES,
    PREFIX,
    WINDOWED,
    build,
    grid_of,
    literal_agcam,
    literal_gradient_rollout,
    literal_reciprocam,
    literal_rollout,
)

from captum_vit import AttentionGuidedGradCAM, AttentionRollout, GradientRollout, LayerReciproCAM

NAMES = list(FAMILIES)
TOL = dict(atol=1e-5, rtol=1e-5)


def _library(name):
    pytest.importorskip(FAMILIES[name][2])


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    _library(request.param)
    model, blocks, images = build(request.param)
    return request.param, model, blocks, images


BLOCKS = {"last": -1, "second last": -2, "first": 0}


@pytest.mark.parametrize("which", list(BLOCKS))
def test_reciprocam_equals_literal_reference(family, which):
    """Every residual on both paths; the fast path is proven for every family and block, never a fallback
    (windowed families have the general path only, and say so)."""
    name, model, blocks, images = family
    before = model_state(model)
    index = BLOCKS[which] % len(blocks)
    explainer = LayerReciproCAM(model, blocks[index])
    targets = torch.tensor([3, 7])
    P, grid = PREFIX[name], grid_of(name, index)
    fast = "general" if name in WINDOWED | CLASS_ATTENTION else "fast"
    for residual in ("unmasked", "normalized", "input"):
        refs = [literal_reciprocam(model, blocks[index], images[b], P, residual=residual, grid=grid)[targets[b]]
                for b in range(2)]
        for path in ("general", "auto"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the fast path must be proven, not fall back with a warning
                got = explainer.attribute(images, target=targets, normalize=False, residual=residual, path=path)
            assert explainer.last_path == ("general" if path == "general" else fast)
            for b in range(2):
                torch.testing.assert_close(got[b, 0], refs[b], **TOL)
    # the paper's options on both paths
    ref = literal_reciprocam(model, blocks[index], images[0], P, "dirac", False, "unmasked", "logits", grid=grid)[3]
    for path in ("general", "fast" if fast == "fast" else "auto"):
        got = explainer.attribute(images, target=targets, normalize=False, kernel="dirac", keep_prefix_tokens=False,
                                  scores="logits", path=path)
        torch.testing.assert_close(got[0, 0], ref, **TOL)
    if fast == "general":
        with pytest.raises(ValueError, match="path='fast' is not exact here: .*no explicit form"):
            explainer.attribute(images, target=targets, path="fast")
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_shifted_window_block_equals_literal_reference(name):
    """The first stage's second block attends in windows shifted by half a window (an attention mask)."""
    _library(name)
    model, blocks, images = build(name)
    before = model_state(model)
    explainer = LayerReciproCAM(model, blocks[1])
    for residual in ("unmasked", "input"):
        got = explainer.attribute(images[:1], target=5, normalize=False, residual=residual)
        ref = literal_reciprocam(model, blocks[1], images[0], 0, residual=residual, grid=(8, 8))[5]
        torch.testing.assert_close(got[0, 0], ref, **TOL)
    assert_same_state(before, model_state(model))


def _attention_refusal(name):
    """The refusal the attention methods must give on family ``name`` (a pattern), or ``None``."""
    if name in WINDOWED:
        return "attend within \\(shifted\\) windows.*Use LayerReciproCAM"
    if name in CLASS_ATTENTION:
        return "class token joins only in the class-attention blocks.*LayerReciproCAM"
    if name in POOLED_STAGES:
        return "pool the grid to a smaller one.*Use LayerReciproCAM"
    if name in PATCH_POOLED:
        return "(reads patch tokens only|has no class token).*[Uu]se LayerReciproCAM"
    return None


@pytest.mark.parametrize("which", ["last", "earlier"])
def test_attention_methods_equal_literal_references(family, which):
    name, model, blocks, images = family
    before = model_state(model)
    chosen = [len(blocks) - 1] if which == "last" else [0, 1]
    methods = (AttentionGuidedGradCAM, AttentionRollout, GradientRollout)
    refusal = _attention_refusal(name)
    if refusal is not None:
        for cls in methods:
            with pytest.raises(TypeError, match=refusal):
                cls(model, layers=chosen)
        assert_same_state(before, model_state(model))
        return
    targets = torch.tensor([3, 7])
    P = PREFIX[name]
    agcam = AttentionGuidedGradCAM(model, layers=chosen).attribute(images, target=targets, normalize=False)
    rollout = AttentionRollout(model, layers=chosen).attribute(images, normalize=False)
    gradient = GradientRollout(model, layers=chosen).attribute(images, target=targets, normalize=False)
    for b in range(2):
        t = int(targets[b])
        torch.testing.assert_close(agcam[b, 0], literal_agcam(model, blocks, chosen, images[b], t, P), **TOL)
        torch.testing.assert_close(rollout[b, 0], literal_rollout(model, blocks, chosen, images[b], P), **TOL)
        torch.testing.assert_close(
            gradient[b, 0], literal_gradient_rollout(model, blocks, chosen, images[b], t, P), **TOL
        )
    assert_same_state(before, model_state(model))


#: families whose keys and values are plain affine maps of the tokens (no qk-norm, RoPE or split biases): the
#: attention at a few rows then never projects the keys and values
FOLDED_KEYS = {
    "timm ViT (2 registers)", "timm DeiT distilled", "timm ViT, avg pool (MAE-style)", "timm NaFlexViT",
    "timm relative-position ViT (shared bias, no prefix token)", "timm PiT (the grid pooled between stages)",
    "torchvision ViT", "transformers ViTForImageClassification", "transformers DeiTForImageClassificationWithTeacher",
    "transformers Dinov2ForImageClassification", "transformers Dinov2WithRegisters (2 registers)",
    "transformers CLIPVisionModel + linear head", "open_clip VisionTransformer + linear head",
    "open_clip CLIP zero-shot (prompts as classes)", "transformers CLIPModel zero-shot (prompts as classes)",
}


def test_prefix_attention_equals_the_attention_module(family):
    """The attention at the first rows, as ViT-ReciproCAM's last block computes it (keys and values folded
    into the queries where they are affine maps of the tokens), equals the module's own output there."""
    from captum_vit.adapters import find_adapter, merge_heads

    name, model, blocks, images = family
    adapter = find_adapter(model)
    views = [adapter.block_view(b) for b in blocks]
    views = [v for v in views if v.math is not None]
    if not views:  # windows and class attention have no explicit form: nothing is computed at a few rows
        assert name in WINDOWED | CLASS_ATTENTION, f"{name}: no block has an explicit attention"
        return
    seen = {}

    def keep(module, args, kwargs, output):
        seen[module] = (args, kwargs, output)

    handles = [v.attention_module.register_forward_hook(keep, with_kwargs=True) for v in views]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    folded = 0
    for view in views:
        math = view.math
        args, kwargs, output = seen[view.attention_module]
        z, call = math.read_call(args, kwargs)
        folded += math.key_value_maps(call) is not None
        rows = 3
        with torch.no_grad():
            got = math.finish(merge_heads(math.prefix_attention(z, call, rows)),
                              z[:, :rows] if math.finish_reads_input else None)
        torch.testing.assert_close(got, math.unwrap_output(output)[:, :rows], **TOL)
    assert (folded == len(views)) == (name in FOLDED_KEYS), f"{name}: {folded} of {len(views)} blocks folded"


#: families whose blocks' MLP branch is a layer norm, a linear layer and the rest (timm's Block with its Mlp): the
#: unmasked residual's copies then compute the MLP's first layer from the image's and the copies' distinct rows
FOLDED_MLP = {"timm ViT (2 registers)", "timm DeiT distilled", "timm ViT, avg pool (MAE-style)", "timm NaFlexViT",
              "timm relative-position ViT (MLP bias, qk-norm)",
              "timm relative-position ViT (shared bias, no prefix token)", "timm PiT (the grid pooled between stages)"}


def test_folded_mlp_equals_the_block_mlp(family):
    """The MLP branch on rows x[t] + s[j, slot], folded through its layer norm and first layer, equals the
    block's own branch on those rows."""
    from captum_vit.adapters import find_adapter
    from captum_vit.reciprocam import FoldedInput, folded_mlp_branch

    name, model, blocks, images = family
    adapter = find_adapter(model)
    views = [adapter.block_view(b) for b in blocks]
    g = torch.Generator().manual_seed(0)
    folded = 0
    for view in views:
        if view.mlp_entry() is None:
            continue
        T, c, r, D = 7, 3, 4, view.mlp_entry().linear.in_features
        x = torch.randn(T, D, generator=g)
        scaled = 0.5 * torch.randn(c, r, D, generator=g)
        rows = (torch.arange(c)[:, None] * r + torch.randint(0, r, (c, T), generator=g)).flatten()
        y = x[None] + scaled.flatten(0, 1)[rows].view(c, T, D)
        with torch.no_grad():
            got = folded_mlp_branch(FoldedInput.of(view, x), scaled, rows)
            torch.testing.assert_close(got, view.mlp_branch(y), **TOL)
        folded += 1
    assert (folded == len(views)) == (name in FOLDED_MLP), f"{name}: {folded} of {len(views)} blocks folded"


def test_supported_models_table_is_current():
    """docs/models.md's table is measured here; CAPTUM_VIT_WRITE_SUPPORT_TABLE=1 writes it
    (python benchmarks/support_table.py)."""
    import os
    from pathlib import Path

    from support_table import page_table, support_table, with_table

    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    page = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    table = support_table()
    assert "differs" not in table
    if os.environ.get("CAPTUM_VIT_WRITE_SUPPORT_TABLE") == "1":
        page.write_text(with_table(page.read_text(), table))
    assert page_table(page.read_text()) == table, (
        "docs/models.md's supported-models table is out of date: python benchmarks/support_table.py"
    )

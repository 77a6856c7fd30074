"""Swin (timm, torchvision, transformers): a grid per stage, non-square and padded grids, Captum's LayerGradCam
on the same grid, the registry, and what is refused by name. ``test_families.py`` covers every residual and block."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state
from families import CLASSES, literal_gradcam, literal_reciprocam, randomize

from captum_vit import AttentionGuidedGradCAM, LayerReciproCAM, TransformerAttribution, UnsupportedModelError
from captum_vit.baselines import vit_layer_gradcam
from captum_vit.methods import explainer

TOL = dict(atol=1e-5, rtol=1e-5)


def timm_swin(img_size):
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=img_size, patch_size=8, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                            window_size=4, num_classes=CLASSES)
    return randomize(model), [*model.layers[0].blocks, *model.layers[1].blocks]


def torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[8, 8], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=CLASSES)
    return randomize(model), [*model.features[1], *model.features[3]]


def hf_swin():
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    model = SwinForImageClassification(SwinConfig(image_size=64, patch_size=8, embed_dim=32, depths=[2, 2],
                                                  num_heads=[2, 4], window_size=4, num_labels=CLASSES))
    return randomize(model), [*model.swin.encoder.layers[0].blocks, *model.swin.encoder.layers[1].blocks]


def logits(model):
    return (lambda x: model(x).logits) if hasattr(model, "swin") else model


MODELS = {"timm": lambda: timm_swin((64, 128)), "torchvision": torchvision_swin, "transformers": hf_swin}


def image(h, w, seed=1):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("library", list(MODELS))
def test_non_square_grids_keep_row_major_order(library):
    """64x128 images: 8x16 then 4x8 grids; a transposed token order would fail here, not on square grids."""
    pytest.importorskip(library)
    model, blocks = MODELS[library]()
    x = image(64, 128)
    for index, grid in ((1, (8, 16)), (3, (4, 8))):
        got = LayerReciproCAM(logits(model), blocks[index], vit=model).attribute(x, target=2, normalize=False)
        assert got.shape == (1, 1, *grid)
        torch.testing.assert_close(got[0, 0], literal_reciprocam(model, blocks[index], x[0], 0, grid=grid)[2], **TOL)


@pytest.mark.parametrize("library", ["torchvision", "transformers"])
def test_odd_grids_are_padded_as_the_model_does(library):
    """72x104 images: a 9x13 grid in 4x4 windows (padded), merged (padded) to 5x7."""
    pytest.importorskip(library)
    model, blocks = MODELS[library]()
    before = model_state(model)
    x = image(72, 104)
    for index, grid in ((1, (9, 13)), (2, (5, 7))):
        cam = LayerReciproCAM(logits(model), blocks[index], vit=model)
        got = cam.attribute(x, target=4, normalize=False, scores="logits")
        ref = literal_reciprocam(model, blocks[index], x[0], 0, scores="logits", grid=grid)[4]
        torch.testing.assert_close(got[0, 0], ref, **TOL)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("library", list(MODELS))
def test_layer_gradcam_reads_each_stage_grid(library):
    pytest.importorskip(library)
    model, blocks = MODELS[library]()
    before = model_state(model)
    x = image(64, 128)
    norm1 = (lambda b: b.layernorm_before) if library == "transformers" else (lambda b: b.norm1)
    for layer, grid in ((None, (4, 8)), (norm1(blocks[0]), (8, 16))):
        got = vit_layer_gradcam(logits(model), layer=layer, vit=model).attribute(x, target=6, relu_attributions=True)
        assert got.shape == (1, 1, *grid)
        ref = literal_gradcam(logits(model), norm1(blocks[-1]) if layer is None else layer, x, 6, grid)
        torch.testing.assert_close(got[0, 0], ref, **TOL)
    assert_same_state(before, model_state(model))


def test_registry_builds_reciprocam_and_refuses_attention_methods_by_name():
    model, _ = timm_swin(64)
    x = image(64, 64)
    maps = explainer("reciprocam-authors", model)(x, torch.tensor([1]))  # block -2
    assert maps.shape == (1, 1, 4, 4)
    assert explainer("reciprocam", model)(x, torch.tensor([1])).shape == (1, 1, 8, 8)  # block -3: an earlier stage
    assert explainer("layergradcam", model)(x, torch.tensor([1])).shape == (1, 1, 4, 4)
    for name in ("agcam", "rollout", "grad-rollout", "relevance"):
        with pytest.raises(UnsupportedModelError, match="windows.*Use LayerReciproCAM"):
            explainer(name, model)


def test_gradient_checkpointing_is_off_while_explaining_and_restored():
    model, blocks = timm_swin(64)
    x = image(64, 64)
    plain = LayerReciproCAM(model, blocks[2]).attribute(x, target=0, normalize=False)
    model.set_grad_checkpointing(True)
    got = LayerReciproCAM(model, blocks[2]).attribute(x, target=0, normalize=False)
    assert all(stage.grad_checkpointing for stage in model.layers)
    torch.testing.assert_close(got, plain, **TOL)


def test_swin_v2_is_refused_by_name():
    from torchvision.models.swin_transformer import swin_v2_t

    v2 = swin_v2_t()
    with pytest.raises(UnsupportedModelError, match="SwinTransformerBlockV2 is not supported.*normalises after"):
        LayerReciproCAM(v2, v2.features[1][0])
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    timm_v2 = SwinTransformerV2(img_size=64, patch_size=8, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4)
    with pytest.raises(UnsupportedModelError, match="SwinTransformerV2.*Swin v2 normalises after attention"):
        LayerReciproCAM(timm_v2, timm_v2.layers[0].blocks[0])
    with pytest.raises(UnsupportedModelError, match="TransformerAttribution is not defined for SwinTransformer"):
        TransformerAttribution(torchvision_swin()[0])
    with pytest.raises(UnsupportedModelError, match="AttentionGuidedGradCAM is not defined"):
        AttentionGuidedGradCAM(timm_swin(64)[0])

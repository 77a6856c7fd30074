"""PiT: the grid shrinks between stages, and a stage passes on only as many rows as it received, so the masked
copies enter at the stage. ``test_families.py`` covers every residual and block; here: chunks of copies, a
distilled PiT (two prefix tokens) and LayerGradCam on a stage's grid."""

from __future__ import annotations

import torch
from conftest import assert_same_state, model_state
from families import CLASSES, build, literal_gradcam, literal_reciprocam, randomize

from captum_vit import LayerReciproCAM
from captum_vit.baselines import vit_layer_gradcam

TOL = dict(atol=1e-5, rtol=1e-5)
PIT = "timm PiT (the grid pooled between stages)"


def test_copies_in_chunks_equal_one_pass():
    model, blocks, images = build(PIT)
    before = model_state(model)
    explainer = LayerReciproCAM(model, blocks[1])
    whole = explainer.attribute(images, target=torch.tensor([1, 2]), normalize=False, path="general")
    for batch_size in (1, 5, 13):
        got = explainer.attribute(images, target=torch.tensor([1, 2]), normalize=False, path="general",
                                  batch_size=batch_size)
        torch.testing.assert_close(got, whole, **TOL)
    assert_same_state(before, model_state(model))


def test_distilled_pit_keeps_both_prefix_tokens():
    from timm.models.pit import PoolingVisionTransformer

    torch.manual_seed(0)
    model = randomize(PoolingVisionTransformer(img_size=64, patch_size=16, stride=8, base_dims=[16, 16], depth=[1, 1],
                                               heads=[2, 4], mlp_ratio=2.0, num_classes=CLASSES, distilled=True))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for stage, grid in ((0, (7, 7)), (1, (4, 4))):
        block = model.transformers[stage].blocks[0]
        got = LayerReciproCAM(model, block).attribute(x, target=3, normalize=False, scores="logits")
        ref = literal_reciprocam(model, block, x[0], 2, scores="logits", grid=grid)[3]
        torch.testing.assert_close(got[0, 0], ref, **TOL)


def test_layer_gradcam_on_the_first_stage_grid():
    model, blocks, images = build(PIT)
    before = model_state(model)
    for layer, grid in ((blocks[0].norm1, (7, 7)), (None, (4, 4))):
        cam = vit_layer_gradcam(model, layer=layer).attribute(images[:1], target=4, relu_attributions=True)
        assert cam.shape == (1, 1, *grid)
        ref = literal_gradcam(model, blocks[-1].norm1 if layer is None else layer, images[:1], 4, grid, P=1)
        torch.testing.assert_close(cam[0, 0], ref, **TOL)
    assert_same_state(before, model_state(model))

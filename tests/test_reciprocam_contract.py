"""LayerReciproCAM under Captum's contract, state hygiene, dtypes and bad input."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerAttribution, NoiseTunnel
from captum.metrics import sensitivity_max
from conftest import assert_same_state, make_model, model_state
from torch import nn

from captum_vit import LayerReciproCAM


@pytest.fixture(scope="module")
def vit():
    return make_model("vit_reg4")


def test_tuple_in_tuple_out_and_per_example_targets(vit):
    model, images = vit
    explainer = LayerReciproCAM(model, model.blocks[-1])
    single = explainer.attribute(images, target=[1, 4])
    as_tuple = explainer.attribute((images,), target=torch.tensor([1, 4]))
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], single)
    assert single.shape == (2, 1, 4, 4)
    one = explainer.attribute(images[1:], target=4)
    torch.testing.assert_close(one, single[1:])


def test_interpolate_to_input_size(vit):
    model, images = vit
    maps = LayerReciproCAM(model, model.blocks[-1]).attribute(images)
    heat = LayerAttribution.interpolate(maps, images.shape[-2:], "bilinear")
    assert heat.shape == (2, 1, 64, 64)


def test_noise_tunnel_runs(vit):
    model, images = vit
    nt = NoiseTunnel(LayerReciproCAM(model, model.blocks[-1]))
    maps = nt.attribute(images, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=2)
    assert maps.shape == (2, 1, 4, 4) and torch.isfinite(maps).all()


def test_sensitivity_max_runs(vit):
    model, images = vit
    explainer = LayerReciproCAM(model, model.blocks[-1])
    sens = sensitivity_max(explainer.attribute, images, target=torch.tensor([0, 3]), n_perturb_samples=2)
    assert sens.shape == (2,) and torch.isfinite(sens).all()


def test_wrapper_forward_func_and_additional_args():
    model, images = make_model("vit_reg4")

    class Wrapper(nn.Module):  # normalises and resizes, like a real deployment
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x, scale):
            x = nn.functional.interpolate(x * scale, size=(64, 64), mode="bilinear", align_corners=False)
            return self.vit(x)

    small = images[:, :, ::2, ::2].contiguous()  # 32x32 in, 64x64 into the ViT
    wrapped = Wrapper(model)
    explainer = LayerReciproCAM(wrapped, model.blocks[-1])
    maps = explainer.attribute(small, target=[0, 1], additional_forward_args=(torch.tensor([[[[2.0]]], [[[0.5]]]]),))
    assert maps.shape == (2, 1, 4, 4)
    fn = LayerReciproCAM(lambda x: model(x), model.blocks[-1], vit=model)
    torch.testing.assert_close(fn.attribute(images), LayerReciproCAM(model, model.blocks[-1]).attribute(images))


def test_state_is_left_exactly_as_found(vit):
    model, images = vit
    model.blocks[0].attn.fused_attn = False  # an unusual but legal setting must survive too
    model.head.weight.requires_grad_(False)
    before = model_state(model)
    explainer = LayerReciproCAM(model, model.blocks[-1])
    explainer.attribute(images)
    explainer.attribute(images, path="general")
    with torch.no_grad():
        explainer.attribute(images, target=[1, 1])
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError):
        explainer.attribute(images, target=99)
    with pytest.raises(ValueError):
        explainer.attribute(images, target=99, path="general")
    assert_same_state(before, model_state(model))
    model.blocks[0].attn.fused_attn = True
    model.head.weight.requires_grad_(True)


def test_train_mode_is_kept_and_warned(vit):
    model, images = vit
    model.train()
    try:
        before = model_state(model)
        with pytest.warns(UserWarning, match="training mode"):
            LayerReciproCAM(model, model.blocks[-1]).attribute(images)
        assert_same_state(before, model_state(model))
    finally:
        model.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model, images = make_model("vit_reg4")
    reference = LayerReciproCAM(model, model.blocks[-1]).attribute(images, target=3, normalize=False, scores="logits")
    half = model.to(dtype)
    explainer = LayerReciproCAM(half, half.blocks[-1])
    for path in ("fast", "general"):
        maps = explainer.attribute(images.to(dtype), target=3, normalize=False, scores="logits", path=path)
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
        torch.testing.assert_close(maps, reference, atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model, images = make_model("deit_tiny_distilled")
    cpu = LayerReciproCAM(model, model.blocks[-1]).attribute(images, target=[1, 2], normalize=False)
    gpu_model = model.cuda()
    for path in ("fast", "general"):
        gpu = LayerReciproCAM(gpu_model, gpu_model.blocks[-1]).attribute(
            images.cuda(), target=[1, 2], normalize=False, path=path
        )
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-3)
    model.cpu()


# -- bad input --------------------------------------------------------------
def test_layer_that_is_not_a_vit_block(vit):
    model, _ = vit
    with pytest.raises(TypeError, match=r"layer is a Linear inside the model, not one of its 3 Block blocks.*model.blocks\[-1\]"):
        LayerReciproCAM(model, model.head)
    with pytest.raises(TypeError, match="layer is a Sequential inside the model"):
        LayerReciproCAM(model, model.blocks)


def test_model_that_is_not_a_vit():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    _, ref = make_model("vit_reg4")
    other, _ = make_model("vit_reg4", seed=3)
    with pytest.raises(TypeError, match="no supported Vision Transformer was found in Sequential. Supported families: timm"):
        LayerReciproCAM(cnn, other.blocks[-1])
    with pytest.raises(TypeError, match="not a torch module.*vit=model"):
        LayerReciproCAM(lambda x: other(x), other.blocks[-1])
    with pytest.raises(TypeError, match="no supported Vision Transformer was found in Sequential"):
        LayerReciproCAM(cnn, other.blocks[-1], vit=cnn)
    model, _ = make_model("vit_reg4", seed=4)
    with pytest.raises(TypeError, match=r"not part of this VisionTransformer.*model.blocks\[-1\]"):
        LayerReciproCAM(model, other.blocks[-1])


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.randn(3, 64, 64), ValueError, r"\(B, C, H, W\)"),
        (torch.randn(1, 1, 3, 64, 64), ValueError, r"\(B, C, H, W\)"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.long), TypeError, "floating point"),
        (torch.empty(0, 3, 64, 64), ValueError, "empty batch"),
        ("not a tensor", TypeError, "image tensor"),
    ],
)
def test_bad_inputs(vit, bad, error, match):
    model, _ = vit
    before = model_state(model)
    with pytest.raises(error, match=match):
        LayerReciproCAM(model, model.blocks[-1]).attribute(bad)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs(vit, value):
    model, images = vit
    bad = images.clone()
    bad[1, 0, 3, 3] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        LayerReciproCAM(model, model.blocks[-1]).attribute(bad)


@pytest.mark.parametrize(
    "target, error, match",
    [
        (10, ValueError, r"out of range.*\[0, 9\]"),
        (-1, ValueError, "out of range"),
        ([1, 2, 3], ValueError, "3 entries but inputs hold 2"),
        (torch.tensor([[1, 2]] * 3), ValueError, "one row per example"),
        (1.5, TypeError, "integer class index"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
        ((1, 2), TypeError, "tuple targets"),
    ],
)
def test_bad_targets(vit, target, error, match):
    model, images = vit
    before = model_state(model)
    with pytest.raises(error, match=match):
        LayerReciproCAM(model, model.blocks[-1]).attribute(images, target=target)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size(vit, batch_size):
    model, images = vit
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LayerReciproCAM(model, model.blocks[-1]).attribute(images, batch_size=batch_size)


@pytest.mark.parametrize("kwargs, match", [({"kernel": "box"}, "kernel"), ({"scores": "probs"}, "scores"), ({"path": "x"}, "path")])
def test_bad_options(vit, kwargs, match):
    model, images = vit
    with pytest.raises(ValueError, match=match):
        LayerReciproCAM(model, model.blocks[-1]).attribute(images, **kwargs)


def test_block_with_foreign_forward_is_refused():
    model, images = make_model("vit_reg4")
    blk = model.blocks[-1]

    def post_norm(x):  # the parts of a pre-norm block, wired post-norm
        x = blk.norm1(x + blk.attn(x))
        return blk.norm2(x + blk.mlp(x))

    blk.forward = post_norm
    explainer = LayerReciproCAM(model, blk)
    before = model_state(model)
    with pytest.raises(TypeError, match="not the pre-norm block"):
        explainer.attribute(images, path="general")
    assert_same_state(before, model_state(model))

    class OwnBlock(nn.Module):  # a block class captum_vit does not know
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model, _ = make_model("vit_reg4")
    model.blocks[-1] = OwnBlock(model.blocks[-1])
    with pytest.raises(TypeError, match="block OwnBlock is not one captum_vit knows"):
        LayerReciproCAM(model, model.blocks[-1])


def test_forward_func_with_wrong_output(vit):
    model, images = vit
    explainer = LayerReciproCAM(lambda x: model(x)[:, None], model.blocks[-1], vit=model)
    with pytest.raises(ValueError, match=r"logits of shape \(N, num_classes\)"):
        explainer.attribute(images, path="general")

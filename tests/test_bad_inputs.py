"""Bad input answered in one line that names the problem and a fix, or handled correctly; the model as found."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_same_state, make_model, model_state
from torch import nn

from captum_vit import (
    AttentionGuidedGradCAM,
    AttentionRollout,
    GradientRollout,
    LayerReciproCAM,
    TransformerAttribution,
)
from captum_vit.metrics import adcc, box_localization, pointing_game

METHODS = {
    "reciprocam": lambda m: LayerReciproCAM(m, m.blocks[-2]),
    "agcam": AttentionGuidedGradCAM,
    "rollout": AttentionRollout,
    "grad-rollout": GradientRollout,
    "relevance": TransformerAttribution,
}


@pytest.fixture(scope="module")
def vit():
    return make_model("vit_reg4")


class Temperature(nn.Module):
    """A per-example temperature on the logits: used after every block."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x, temperature):
        return self.vit(x) / temperature[:, None]


class Scale(nn.Module):
    """A per-example (or, by mistake, per-channel) scale on the image: used before every block."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x, scale):
        return self.vit(x * scale[:, None, None, None])


@pytest.mark.parametrize("name", list(METHODS))
def test_meta_tensors_are_refused_by_every_method(vit, name):
    model, images = vit
    before = model_state(model)
    method = METHODS[name](model)
    with pytest.raises(ValueError, match="inputs is on the meta device.*real tensors"):
        method.attribute(images.to("meta"))
    with pytest.raises(ValueError, match="target is on the meta device"):
        method.attribute(images, target=torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match=r"additional_forward_args\[0\] contains NaN"):
        method.attribute(images, additional_forward_args=(torch.tensor([1.0, float("nan")]),))
    assert_same_state(before, model_state(model))


def test_vit_must_be_the_module():
    model, _ = make_model("vit_reg4")
    for cls in (AttentionGuidedGradCAM, lambda fn, vit: LayerReciproCAM(fn, model.blocks[-1], vit=vit)):
        with pytest.raises(TypeError, match="vit must be the torch module that holds the ViT.*got str 'deit'"):
            cls(lambda x: model(x), vit="deit")


@pytest.mark.parametrize("path", ["fast", "general"])
def test_a_per_example_tensor_used_after_the_explained_block_follows_its_copies(vit, path):
    model, images = vit
    wrapped = Temperature(model)
    cam = LayerReciproCAM(wrapped, model.blocks[-2])
    temperature = torch.tensor([0.5, 4.0])
    maps = cam.attribute(images, target=[1, 2], additional_forward_args=(temperature,), normalize=False, path=path)
    for b in range(2):  # each image alone: its temperature is one number for all its copies
        alone = cam.attribute(images[b : b + 1], target=[1, 2][b], normalize=False, path=path,
                              additional_forward_args=(temperature[b : b + 1],))
        torch.testing.assert_close(maps[b], alone[0], atol=1e-6, rtol=1e-5)


def test_a_per_channel_vector_split_as_per_example_is_said():
    model, images = make_model("vit_reg4")
    images = torch.cat([images, images[:1]])  # B = 3 = C: a (3,) vector is ambiguous
    wrapped = Scale(model)
    scale = torch.tensor([1.0, 2.0, 0.5])
    with pytest.warns(UserWarning, match=r"additional_forward_args\[0\] has shape \(3,\).*per colour channel.*bind it"):
        chunked = AttentionGuidedGradCAM(wrapped).attribute(images, additional_forward_args=(scale,), batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unsplit (one chunk) there is nothing to say
        whole = AttentionGuidedGradCAM(wrapped).attribute(images, additional_forward_args=(scale,))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)  # the rule: one value per example


@pytest.mark.parametrize("name", ["reciprocam", "agcam", "relevance"])
def test_the_callers_own_forward_errors_are_said_as_theirs(vit, name):
    model, images = vit
    before = model_state(model)
    method = METHODS[name](model)
    # timm's forward takes an attention mask second: an extra int fails there, deep inside
    with pytest.raises(TypeError, match=r"forward_func fails on these inputs by itself, before .* changes anything"):
        method.attribute(images, additional_forward_args=(3,))
    with pytest.raises(RuntimeError, match=r"fails on these inputs by itself.*forward_func\(\*inputs, "):
        method.attribute((images, images))  # a second input to a one-input model
    assert_same_state(before, model_state(model))


def test_metric_arguments_are_checked():
    model, images = make_model("vit_reg4")
    cam = LayerReciproCAM(model, model.blocks[-1])
    with pytest.raises(ValueError, match=r"baseline of shape \(5,\) does not broadcast to the images' \(2, 3, 64, 64\)"):
        adcc(model, cam, images, baseline=torch.zeros(5))
    per_channel = adcc(model, cam, images, baseline=torch.zeros(3, 1, 1))
    torch.testing.assert_close(per_channel.adcc, adcc(model, cam, images, baseline=0.0).adcc)
    maps = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"box \(3, 3, 1, 1\) is empty or inverted.*\(x, y, x \+ width, y \+ height\)"):
        box_localization(maps, [[(3, 3, 1, 1)]], size=(64, 64))
    with pytest.raises(ValueError, match="size must be the \\(H, W\\).*two positive integers; got \\(0, 0\\)"):
        box_localization(maps, [[(0, 0, 2, 2)]], size=(0, 0))
    with pytest.raises(ValueError, match="lies outside the 64x64 image"):
        box_localization(maps, [[(70, 70, 80, 80)]], size=(64, 64))


def test_pointing_game_reads_a_list_of_cell_targets_as_the_tensor():
    model, _ = make_model("vit_reg4")
    cam = LayerReciproCAM(model, model.blocks[-1])
    mosaics = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    as_list = pointing_game(cam, mosaics, [[1, 2, 3, 4], [5, 6, 7, 8]])  # row = mosaic, column = cell
    torch.testing.assert_close(as_list, pointing_game(cam, mosaics, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])))
    with pytest.raises(ValueError, match=r"cell_targets must be \(N, 4\).*got shape \(4,\)"):
        pointing_game(cam, mosaics[:1], [1, 2, 3, 4])

"""AttnLRP against the maps its authors' library LXT produced, and on every family.

``tests/data/attnlrp_reference.pt`` holds what LXT 2.1 (package ``lxt``, with
zennit 0.5.1) computed, run as its own ViT example runs it
(``examples/vit_torch.py``: ``monkey_patch`` of torchvision's ViT,
``monkey_patch_zennit``, zennit ``Gamma`` on every ``Conv2d`` and ``Linear``,
``(x * x.grad).sum(1)``), by ``benchmarks/attnlrp_reference.py``: on a small
torchvision ViT with random weights, and on the embedded DeiT-Tiny whose
weights that script copies into torchvision's layout. Here the DeiT is the
timm model itself, through its own adapter: the same maths in another
family's modules.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, model_state
from families import FAMILIES, build

from captum_vit import AttnLRP
from captum_vit.adapters import UnsupportedModelError
from captum_vit.attnlrp import ConservativeAttention, UniformAttention
from captum_vit.models import default_model, sample_images

DATA = Path(__file__).resolve().parent / "data" / "attnlrp_reference.pt"


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA)


@pytest.fixture(scope="module")
def torchvision_model(reference):
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    model.load_state_dict(reference["tv/state"])
    return model.eval()


@pytest.fixture(scope="module")
def deit():
    loaded = default_model()
    pictures, _ = sample_images()
    images = torch.stack([loaded.transform(p) for p in pictures[:3]])
    # upsampled as the embedded model's forward does, so LXT and captum_vit see the same 224 x 224 input
    return loaded.vit.float().eval(), F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)


def tolerance(conv_gamma: float) -> float:
    """Of the largest |relevance|: float32 rounding of two implementations of the same sums. The gamma rule's
    sums grow with gamma, and at conv_gamma=100 their rounding is about 100 times larger."""
    return 5e-4 if conv_gamma > 1 else 2e-5


def _close(ours: torch.Tensor, theirs: torch.Tensor, conv_gamma: float) -> None:
    scale = theirs.abs().max()
    err = float((ours - theirs).abs().max() / scale)
    assert err <= tolerance(conv_gamma), f"differs from LXT by {err:.2e} of the largest relevance"


@pytest.mark.parametrize("setting", range(3))
def test_equals_lxt_on_torchvision(reference, torchvision_model, setting):
    conv_gamma, linear_gamma = reference["tv/settings"][setting]
    before = model_state(torchvision_model)
    method = AttnLRP(torchvision_model, conv_gamma=conv_gamma, linear_gamma=linear_gamma)
    ours = method.attribute(reference["tv/images"], target=reference["tv/classes"], normalize=False)
    assert ours.shape == (3, 1, 64, 64)
    _close(ours[:, 0], reference[f"tv/{conv_gamma}/{linear_gamma}"], conv_gamma)
    assert_same_state(before, model_state(torchvision_model))


@pytest.mark.parametrize("setting", range(2))
def test_equals_lxt_on_the_embedded_deit(reference, deit, setting):
    model, images = deit
    conv_gamma, linear_gamma = reference["deit/settings"][setting]
    ours = AttnLRP(model, conv_gamma=conv_gamma, linear_gamma=linear_gamma).attribute(
        images, target=reference["deit/classes"], normalize=False)
    _close(ours[:, 0], reference[f"deit/{conv_gamma}/{linear_gamma}"], conv_gamma)


def test_predicted_class_is_the_default_target(reference, torchvision_model):
    images = reference["tv/images"]
    assert torch.equal(torchvision_model(images).argmax(1), reference["tv/classes"])
    method = AttnLRP(torchvision_model)
    torch.testing.assert_close(method.attribute(images, normalize=False),
                               method.attribute(images, target=reference["tv/classes"], normalize=False))


def test_grid_is_each_patch_sum_and_batches_are_examples(reference, torchvision_model):
    images = reference["tv/images"]
    pixels = AttnLRP(torchvision_model).attribute(images, target=[1, 2, 3], normalize=False)
    grid = AttnLRP(torchvision_model, space="grid").attribute(images, target=[1, 2, 3], normalize=False)
    assert grid.shape == (3, 1, 4, 4)
    torch.testing.assert_close(grid, pixels.unfold(2, 16, 16).unfold(3, 16, 16).sum((-1, -2)), rtol=1e-5, atol=1e-7)
    one_by_one = torch.cat([AttnLRP(torchvision_model).attribute(images[i : i + 1], target=[i + 1], normalize=False)
                            for i in range(3)])
    torch.testing.assert_close(pixels, one_by_one, rtol=1e-5, atol=1e-8)
    chunked = AttnLRP(torchvision_model).attribute(images, target=[1, 2, 3], normalize=False, batch_size=2)
    torch.testing.assert_close(pixels, chunked, rtol=1e-5, atol=1e-8)
    two = AttnLRP(torchvision_model).attribute(images, target=torch.tensor([[1, 2]] * 3), normalize=False)
    assert two.shape == (3, 2, 64, 64)
    torch.testing.assert_close(two[:, :1], AttnLRP(torchvision_model).attribute(images, target=1, normalize=False))


def test_uniform_rule_equals_lxt_division_of_q_k_v():
    """LXT's AttnLRP divides the gradient at q and k by 4 and at v by 2 (``wrap_attention_forward``); the
    rule here divides it at the scores by 4 and at v by 2: the same gradients, rotary or bias terms included."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, requires_grad=True) for _ in range(3))
    bias, out_grad = torch.randn(3, 5, 5, generator=g), torch.randn(2, 3, 5, 4, generator=g)

    def divided(t, factor):
        return t / factor + (t - t / factor).detach()

    lxt = ((divided(q, 4) @ divided(k, 4).transpose(-2, -1) * 0.5 + bias).softmax(-1) @ divided(v, 2))
    theirs = torch.autograd.grad(lxt, (q, k, v), out_grad)
    rule = UniformAttention()
    ours_out = rule.weights(rule.scores(q @ k.transpose(-2, -1) * 0.5 + bias).softmax(-1)) @ rule.values(v)
    ours = torch.autograd.grad(ours_out, (q, k, v), out_grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    cp = ConservativeAttention()
    cp_out = cp.weights(cp.scores(q @ k.transpose(-2, -1)).softmax(-1)) @ cp.values(v)
    dq, dk, dv = torch.autograd.grad(cp_out, (q, k, v), out_grad, allow_unused=True)
    assert dq is None and dk is None and dv is not None  # CP-LRP: no gradient through the softmax


def test_attention_rules_change_the_map_and_leave_values(torchvision_model, reference):
    images = reference["tv/images"]
    cp = AttnLRP(torchvision_model).attribute(images, target=1, normalize=False)
    uniform = AttnLRP(torchvision_model, attention_rule="attnlrp").attribute(images, target=1, normalize=False)
    assert not torch.allclose(cp, uniform)
    assert torch.isfinite(uniform).all()


def test_dtypes(torchvision_model, reference):
    images = reference["tv/images"]
    f32 = AttnLRP(torchvision_model).attribute(images, target=1, normalize=False)
    import copy

    f64_model = copy.deepcopy(torchvision_model).double()
    f64 = AttnLRP(f64_model).attribute(images.double(), target=1, normalize=False)
    assert f64.dtype == torch.float32
    torch.testing.assert_close(f64, f32, rtol=1e-3, atol=1e-3 * float(f32.abs().max()))
    bf16_model = copy.deepcopy(torchvision_model).to(torch.bfloat16)
    before = model_state(bf16_model)
    bf16 = AttnLRP(bf16_model).attribute(images.to(torch.bfloat16), target=1, normalize=False)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    # computed on a float32 copy of the bfloat16 weights: close to the float32 model's map, not equal
    assert torch.corrcoef(torch.stack([bf16.flatten(), f32.flatten()]))[0, 1] > 0.9
    assert_same_state(before, model_state(bf16_model))


def test_bad_options_are_refused(torchvision_model):
    with pytest.raises(ValueError, match="attention_rule"):
        AttnLRP(torchvision_model, attention_rule="softmax")
    with pytest.raises(ValueError, match="linear_gamma must be a number >= 0"):
        AttnLRP(torchvision_model, linear_gamma=-1)
    with pytest.raises(ValueError, match="space"):
        AttnLRP(torchvision_model, space="tokens")


#: families whose every layer has a rule and whose attention has an explicit form
SUPPORTED = {
    "timm ViT (2 registers)", "timm DeiT distilled", "timm ViT, avg pool (MAE-style)", "timm NaFlexViT",
    "timm RoPE ViT (qk-norm, avg pool)", "timm BEiT (relative position bias)",
    "timm relative-position ViT (MLP bias, qk-norm)", "timm relative-position ViT (shared bias, no prefix token)",
    "torchvision ViT", "transformers ViTForImageClassification",
    "transformers DeiTForImageClassificationWithTeacher", "transformers Dinov2ForImageClassification",
    "transformers Dinov2WithRegisters (2 registers)", "transformers CLIPVisionModel + linear head",
    "open_clip VisionTransformer + linear head", "open_clip CLIP zero-shot (prompts as classes)",
    "transformers CLIPModel zero-shot (prompts as classes)",
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_works_or_is_refused_clearly(name):
    pytest.importorskip(FAMILIES[name][2])
    model, _, images = build(name)
    before = model_state(model)
    if name not in SUPPORTED:
        with pytest.raises(UnsupportedModelError, match="Use LayerReciproCAM|LayerReciproCAM"):
            AttnLRP(model)
        assert_same_state(before, model_state(model))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may give flat maps
        maps = AttnLRP(model).attribute(images, target=[3, 7], normalize=False)
        single = AttnLRP(model).attribute(images[1:], target=[7], normalize=False)
    assert maps.shape == (2, 1, *images.shape[-2:]) and torch.isfinite(maps).all()
    assert maps.abs().sum() > 0
    torch.testing.assert_close(maps[1:], single, rtol=1e-4, atol=1e-6 * float(maps.abs().max()))
    assert_same_state(before, model_state(model))

"""AGCAM, Attention Rollout and gradient rollout against literal references."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import NoiseTunnel
from captum.metrics import infidelity, sensitivity_max
from conftest import assert_same_state, make_model, model_state

from captum_vit import AttentionGuidedGradCAM, AttentionRollout, GradientRollout, LayerReciproCAM


def literal_forward(model, image, detach_attention_input):
    """One image through timm's sub-modules with explicit attention matrices."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
    scores, weights = [], []
    for blk in model.blocks:
        a = blk.attn
        inp = blk.norm1(x)
        if detach_attention_input:
            inp = inp.detach()
        _, N, _ = inp.shape
        qkv = a.qkv(inp).reshape(1, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        s = (q * a.scale) @ k.transpose(-2, -1)
        w = s.softmax(dim=-1)
        o = (w @ v).transpose(1, 2).reshape(1, N, -1)
        x = x + blk.ls1(a.proj(a.norm(o)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        scores.append(s)
        weights.append(w)
    return model.forward_head(model.norm(x))[0], scores, weights


def grid_of(model, image):
    return model.patch_embed.dynamic_feat_size(tuple(image.shape[-2:]))


def literal_agcam(model, image, target):
    logits, scores, weights = literal_forward(model, image, detach_attention_input=True)
    grads = torch.autograd.grad(logits[target], weights)
    P = model.num_prefix_tokens
    cam = sum((s[0, :, 0, P:].sigmoid() * g[0, :, 0, P:].relu()).sum(0) for s, g in zip(scores, grads))
    return cam.reshape(grid_of(model, image)).detach()


def literal_rollout(model, image):
    with torch.no_grad():
        _, _, weights = literal_forward(model, image, detach_attention_input=False)
    T = weights[0].shape[-1]
    rollout = torch.eye(T)
    for w in weights:
        a = w[0].mean(0) + torch.eye(T)
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout[0, model.num_prefix_tokens :].reshape(grid_of(model, image))


def literal_gradient_rollout(model, image, target):
    logits, _, weights = literal_forward(model, image, detach_attention_input=False)
    grads = torch.autograd.grad(logits[target], weights)
    T = weights[0].shape[-1]
    relevance = torch.eye(T)
    for w, g in zip(weights, grads):
        relevance = relevance + (g[0] * w[0]).clamp(min=0).mean(0) @ relevance  # Eq. 5: ReLU, then head mean
    return relevance[0, model.num_prefix_tokens :].reshape(grid_of(model, image)).detach()


MODELS = ["deit_tiny", "deit_tiny_distilled", "vit_reg4", "vit_nonsquare"]


@pytest.mark.parametrize("name", MODELS)
def test_agcam_equals_literal_reference(name):
    model, images = make_model(name)
    images = torch.cat([images, images.flip(0)[:1]])  # three examples, mixed targets
    targets = torch.tensor([3, 7, 3])
    got = AttentionGuidedGradCAM(model).attribute(images, target=targets, normalize=False)
    assert got.shape[:2] == (3, 1)
    for b in range(3):
        torch.testing.assert_close(got[b, 0], literal_agcam(model, images[b], targets[b]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_rollouts_equal_literal_references(name):
    model, images = make_model(name)
    targets = torch.tensor([1, 8])
    rollout = AttentionRollout(model).attribute(images, normalize=False)
    gradient = GradientRollout(model).attribute(images, target=targets, normalize=False)
    for b in range(2):
        torch.testing.assert_close(rollout[b, 0], literal_rollout(model, images[b]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            gradient[b, 0], literal_gradient_rollout(model, images[b], targets[b]), atol=1e-5, rtol=1e-5
        )


def test_block_subset():
    model, images = make_model("vit_reg4")
    full = AttentionGuidedGradCAM(model).attribute(images, target=2, normalize=False)
    parts = [AttentionGuidedGradCAM(model, layers=[i]).attribute(images, target=2, normalize=False) for i in range(3)]
    torch.testing.assert_close(full, sum(parts))
    same = AttentionGuidedGradCAM(model, layers=[model.blocks[0], -2, 2]).attribute(images, target=2, normalize=False)
    torch.testing.assert_close(full, same)


@pytest.mark.parametrize("cls", [AttentionGuidedGradCAM, GradientRollout, AttentionRollout])
def test_several_targets_chunks_and_tuples(cls):
    model, images = make_model("deit_tiny_distilled")
    explainer = cls(model)
    several = explainer.attribute(images, target=torch.tensor([[0, 5], [9, 9]]), normalize=False)
    assert several.shape == (2, 2, 7, 7)
    for j in range(2):
        column = explainer.attribute(images, target=torch.tensor([[0, 5], [9, 9]])[:, j], normalize=False)
        torch.testing.assert_close(several[:, j : j + 1], column)
    torch.testing.assert_close(explainer.attribute(images, target=[0, 9], batch_size=1), explainer.attribute(images, target=[0, 9]))
    out = explainer.attribute((images,), target=1)
    assert isinstance(out, tuple) and out[0].shape == (2, 1, 7, 7)
    predicted = model(images).argmax(1)
    torch.testing.assert_close(explainer.attribute(images), explainer.attribute(images, target=predicted))


@pytest.mark.parametrize("cls", [AttentionGuidedGradCAM, GradientRollout, AttentionRollout])
def test_state_and_outputs_unchanged(cls):
    model, images = make_model("vit_reg4")
    with torch.no_grad():
        logits_before = model(images)
    before = model_state(model)
    explainer = cls(model)
    explainer.attribute(images, target=1)
    with torch.no_grad():  # Captum's metrics call explainers like this
        explainer.attribute(images, target=1)
    assert_same_state(before, model_state(model))
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits_before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        explainer.attribute(images, target=42)
    assert_same_state(before, model_state(model))


def test_frozen_parameters_and_exceptions_inside_forward():
    model, images = make_model("deit_tiny")
    for p in model.parameters():
        p.requires_grad_(False)
    before = model_state(model)
    maps = AttentionGuidedGradCAM(model).attribute(images, target=[1, 2], normalize=False)
    rollout = GradientRollout(model).attribute(images, target=[1, 2], normalize=False)
    assert maps.abs().sum() > 0 and rollout.abs().sum() > 0
    assert_same_state(before, model_state(model))

    def failing(x):
        model(x)
        raise RuntimeError("user code failed")

    for cls in (AttentionGuidedGradCAM, GradientRollout, AttentionRollout):
        with pytest.raises(RuntimeError, match="user code failed"):
            cls(failing, vit=model).attribute(images)
        assert_same_state(before, model_state(model))


def test_captum_metrics_run_with_agcam():
    model, images = make_model("vit_reg4")
    agcam = AttentionGuidedGradCAM(model)
    sens = sensitivity_max(agcam.attribute, images, target=torch.tensor([0, 3]), n_perturb_samples=2)
    assert sens.shape == (2,) and torch.isfinite(sens).all()

    def upsampled(x, target):
        maps = agcam.attribute(x, target=target)
        return torch.nn.functional.interpolate(maps, size=x.shape[-2:], mode="bilinear").expand_as(x)

    def perturb(x):
        noise = 0.05 * torch.randn_like(x)
        return noise, x - noise

    infid = infidelity(model, perturb, images, upsampled(images, torch.tensor([0, 3])), target=torch.tensor([0, 3]))
    assert infid.shape == (2,) and torch.isfinite(infid).all()
    nt = NoiseTunnel(agcam).attribute(images, nt_samples=2, stdevs=0.05, target=1)
    assert nt.shape == (2, 1, 4, 4)


def test_errors():
    model, images = make_model("vit_avgpool")
    from timm.models.vision_transformer import VisionTransformer

    no_cls = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        AttentionGuidedGradCAM(no_cls)
    with pytest.raises(ValueError, match=r"head of this VisionTransformer reads patch tokens only \(average pooling\)"):
        AttentionGuidedGradCAM(model)  # an MAE-style head: the class token's row never reaches it
    for cls in (AttentionRollout, GradientRollout):
        with pytest.raises(ValueError, match="Use LayerReciproCAM"):
            cls(model)
    model, images = make_model("vit_reg4")
    with pytest.raises(ValueError, match="out of range"):
        AttentionGuidedGradCAM(model, layers=[7])
    with pytest.raises(TypeError, match="block indices"):
        AttentionRollout(model, layers=["last"])
    with pytest.raises(ValueError, match="NaN"):
        AttentionGuidedGradCAM(model).attribute(images * float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        GradientRollout(model).attribute(images, batch_size=0)
    with pytest.raises(TypeError, match="no supported Vision Transformer was found in Linear"):
        AttentionGuidedGradCAM(torch.nn.Linear(3, 3))
    blk = model.blocks[0]
    blk.attn = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"Identity of model.blocks\[0\] has no explicit form"):
        AttentionGuidedGradCAM(model)
    token_model, images = make_model("vit_reg4")
    token_model.blocks[-1].attn = torch.nn.Identity().eval()
    with pytest.raises(ValueError, match="Identity has no explicit form"):
        LayerReciproCAM(token_model, token_model.blocks[-1]).attribute(images, path="fast")


def test_every_method_warns_about_flat_maps_and_only_then():
    """A map within rounding of constant is said in a warning (the CLI and the figures flag the same maps)."""
    model, images = make_model("vit_reg4")
    with torch.no_grad():
        model.head.weight.mul_(1e4)  # a saturated softmax: every masked copy scores p = 1
    cam = LayerReciproCAM(model, model.blocks[-1])
    with pytest.warns(UserWarning, match=r"ViT-ReciproCAM: 2 of 2 maps are flat.*try scores='logits'"):
        cam.attribute(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam.attribute(images, scores="logits")  # the logits still differ
    uniform, images = make_model("vit_reg4")
    with torch.no_grad():
        for block in uniform.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()  # every attention row uniform: the rollout is constant
    with pytest.warns(UserWarning, match="AttentionRollout: 2 of 2 maps are flat"):
        AttentionRollout(uniform).attribute(images)

"""Transformer Attribution (Chefer et al., CVPR 2021) against a literal re-implementation of the
authors' layer-by-layer rules, written here the way their code does it: one image at a time, each rule
as ``gradprop`` (``torch.autograd.grad``) over stored inputs, every sum over the whole tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, make_model, model_state

from captum_vit import TransformerAttribution
from captum_vit.relevance import add_relevance, clone_relevance, linear_relevance, product_relevance

TOL = dict(atol=1e-5, rtol=1e-5)


# -- the authors' rules, batch 1 ----------------------------------------------------------------
def safe_divide(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def gradprop(Z, X, S):
    return torch.autograd.grad(Z, X, S, retain_graph=True)


def rel_linear(x, weight, R):  # layers_ours.Linear.relprop, alpha=1 (beta=0)
    x = x.detach().requires_grad_(True)
    px, nx = torch.clamp(x, min=0), torch.clamp(x, max=0)
    pw, nw = torch.clamp(weight, min=0), torch.clamp(weight, max=0)

    def f(w1, w2, x1, x2):
        Z1, Z2 = F.linear(x1, w1), F.linear(x2, w2)
        S1 = safe_divide(R, Z1 + Z2)
        S2 = safe_divide(R, Z1 + Z2)
        C1 = x1 * torch.autograd.grad(Z1, x1, S1, retain_graph=True)[0]
        C2 = x2 * torch.autograd.grad(Z2, x2, S2, retain_graph=True)[0]
        return C1 + C2

    return f(pw, nw, px, nx).detach()


def rel_simple(forward, X, R):  # RelPropSimple (einsum)
    X = [t.detach().requires_grad_(True) for t in X]
    Z = forward(*X)
    S = safe_divide(R, Z)
    C = gradprop(Z, X, S)
    return [X[0] * C[0], X[1] * C[1]]


def rel_add(X, R):  # layers_ours.Add.relprop: sums over the whole tensor
    X = [t.detach().requires_grad_(True) for t in X]
    Z = X[0] + X[1]
    S = safe_divide(R, Z)
    C = gradprop(Z, X, S)
    a, b = X[0] * C[0], X[1] * C[1]
    a_sum, b_sum = a.sum(), b.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    return (a * safe_divide(a_fact, a.sum())).detach(), (b * safe_divide(b_fact, b.sum())).detach()


def rel_clone(X, Rs):  # layers_ours.Clone.relprop
    X = X.detach().requires_grad_(True)
    Z = [X, X]
    S = [safe_divide(r, z) for r, z in zip(Rs, Z)]
    C = torch.autograd.grad(Z, X, S, retain_graph=True)[0]
    return (X * C).detach()


def literal_transformer_attribution(model, image, target):
    """ViT_LRP.VisionTransformer.relprop(method="transformer_attribution", start_layer=0) for timm's ViT."""
    x_in = image[None]
    # the forward, storing what each layer's relprop reads; attention gradients from the plain backward
    x = model._pos_embed(model.patch_embed(x_in))
    stored, attentions = [], []
    for blk in model.blocks:
        a = blk.attn
        z1 = blk.norm1(x)
        B, N, C = z1.shape
        q, k, v = a.qkv(z1).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        attn.retain_grad()
        o = (attn @ v).transpose(1, 2).reshape(B, N, C)
        ao = a.proj(o)
        x_mid = x + ao
        z2 = blk.norm2(x_mid)
        h = blk.mlp.act(blk.mlp.fc1(z2))
        mo = blk.mlp.fc2(h)
        stored.append(dict(x=x, z1=z1, q=q, k=k, v=v, attn=attn, o=o, ao=ao, x_mid=x_mid, z2=z2, h=h, mo=mo))
        attentions.append(attn)
        x = x_mid + mo
    normed = model.norm(x)
    pooled = normed[:, 0]
    logits = model.head(pooled)
    logits[0, target].backward()
    # relprop from the one-hot
    one_hot = torch.zeros(1, logits.shape[1], dtype=logits.dtype)
    one_hot[0, target] = 1
    R = rel_linear(pooled, model.head.weight, one_hot)
    X = normed.detach().requires_grad_(True)
    Z = torch.index_select(X, 1, torch.tensor([0]))
    C = gradprop(Z, X, safe_divide(R[:, None], Z))
    R = (X * C[0]).detach()  # pool; norm: through
    cams = [None] * len(model.blocks)
    for i in reversed(range(len(model.blocks))):
        s, blk, H = stored[i], model.blocks[i], model.blocks[i].attn.num_heads
        R1, R2 = rel_add([s["x_mid"], s["mo"]], R)
        R2 = rel_linear(s["h"], blk.mlp.fc2.weight, R2)
        R2 = rel_linear(s["z2"], blk.mlp.fc1.weight, R2)  # GELU, norm2: through
        R = rel_clone(s["x_mid"], (R1, R2))
        R1, R2 = rel_add([s["x"], s["ao"]], R)
        R2 = rel_linear(s["o"], blk.attn.proj.weight, R2)
        B, N, C = R2.shape
        R2 = R2.reshape(B, N, H, C // H).transpose(1, 2)
        cam1, cam_v = rel_simple(lambda a_, v_: a_ @ v_, [s["attn"], s["v"]], R2)
        cam1, cam_v = cam1 / 2, cam_v / 2
        cams[i] = cam1.detach()
        cam_q, cam_k = rel_simple(lambda q_, k_: q_ @ k_.transpose(-2, -1), [s["q"], s["k"]], cam1)
        cam_q, cam_k = cam_q / 2, cam_k / 2
        cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * C)
        R2 = rel_linear(s["z1"], blk.attn.qkv.weight, cam_qkv.detach())
        R = rel_clone(s["x"], (R1, R2))
    # transformer attribution: grad * cam, clamp, head mean, rollout with + I from the first block
    T = attentions[0].shape[-1]
    rollout = None
    for attn, cam in zip(attentions, cams):
        layer = (attn.grad[0] * cam[0]).clamp(min=0).mean(dim=0) + torch.eye(T, dtype=attn.dtype)
        rollout = layer if rollout is None else layer @ rollout
    model.zero_grad(set_to_none=True)
    return rollout[0, model.num_prefix_tokens :]


@pytest.mark.parametrize("name", ["deit_tiny", "vit_reg4"])
def test_transformer_attribution_equals_the_authors_rules_image_by_image(name):
    model, images = make_model(name)
    before = model_state(model)
    targets = torch.tensor([3, 7])
    maps = TransformerAttribution(model).attribute(images, target=targets, normalize=False)  # computed in float64
    h, w = maps.shape[-2:]
    in_float64 = copy.deepcopy(model).double()  # the rules are ill-conditioned: compare in one precision
    for b in range(images.shape[0]):
        expected = literal_transformer_attribution(in_float64, images[b].double(), int(targets[b])).reshape(h, w)
        torch.testing.assert_close(maps[b, 0], expected.float(), **TOL)
    two = TransformerAttribution(model).attribute(images, target=torch.tensor([[3, 1], [7, 7]]), normalize=False)
    torch.testing.assert_close(two[:, 0], maps[:, 0], **TOL)
    assert not torch.allclose(two[0, 1], two[0, 0])  # class-specific
    assert_same_state(before, model_state(model))


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_each_rule_conserves_relevance_per_example():
    x, w, r = _random(2, 5, 8), _random(6, 8, seed=1), _random(2, 5, 6, seed=2)
    torch.testing.assert_close(linear_relevance(x, w, r).sum((1, 2)), r.sum((1, 2)))
    a, b, ra = _random(2, 3, 5, 5, seed=3).softmax(-1), _random(2, 3, 5, 4, seed=4), _random(2, 3, 5, 4, seed=5)
    r_a, r_b = product_relevance(a, b, ra)
    torch.testing.assert_close((r_a.sum((1, 2, 3)) + r_b.sum((1, 2, 3))), ra.sum((1, 2, 3)))
    u, v, rr = _random(2, 5, 8, seed=6), _random(2, 5, 8, seed=7), _random(2, 5, 8, seed=8)
    r_u, r_v = add_relevance(u, v, rr)
    torch.testing.assert_close(r_u.sum((1, 2)) + r_v.sum((1, 2)), rr.sum((1, 2)))
    torch.testing.assert_close(clone_relevance(u, v, rr), v + rr, rtol=1e-4, atol=1e-6)  # safe_divide adds 1e-9
    # per example: the first example's split does not depend on the second
    r_u1, _ = add_relevance(u[:1], v[:1], rr[:1])
    torch.testing.assert_close(r_u1, r_u[:1])


def test_relevance_is_conserved_through_a_whole_block():
    from captum_vit.adapters import find_adapter
    from captum_vit.relevance import block_relevance

    model, images = make_model("deit_tiny")
    model = model.double()
    adapter = find_adapter(model)
    x = model._pos_embed(model.patch_embed(images.double()))
    relevance = _random(*x.shape, seed=9).abs()
    with torch.no_grad():
        r_x, r_attention, y = block_relevance(adapter.lrp_block(adapter.block_view(model.blocks[0])), x, relevance)
        torch.testing.assert_close(y, model.blocks[0](x))
    torch.testing.assert_close(r_x.sum((1, 2)), relevance.sum((1, 2)), rtol=1e-6, atol=1e-6)
    assert r_attention.shape == (2, 3, x.shape[1], x.shape[1])


@pytest.mark.parametrize("name", ["deit_tiny_distilled", "vit_qknorm_layerscale", "vit_avgpool"])
def test_models_outside_the_authors_rules_are_refused(name):
    model, _ = make_model(name)
    with pytest.raises(TypeError, match="TransformerAttribution (needs LRP rules for every part|explains through)"):
        TransformerAttribution(model)


# -- the authors' own code, and precision ------------------------------------------------------
CHEFER = Path(__file__).resolve().parent / "data" / "chefer_reference.npz"


@pytest.fixture(scope="module")
def chefer():
    from captum_vit.models import default_model

    return dict(np.load(CHEFER)), default_model()


def _range_error(got, reference):
    flat_ref = reference.flatten(1)
    return ((got.flatten(1) - flat_ref).abs().max(1).values / (flat_ref.max(1).values - flat_ref.min(1).values))


def test_maps_equal_the_authors_code_in_float64(chefer):
    """tests/data/chefer_reference.npz: maps of hila-chefer/Transformer-Explainability's ViT_LRP (run unedited by
    benchmarks/chefer_reference.py) on the embedded DeiT-Tiny, in float64."""
    data, loaded = chefer
    images, classes = torch.from_numpy(data["images"]), torch.from_numpy(data["classes"])
    theirs = torch.from_numpy(data["float64/map"])
    ours = TransformerAttribution(loaded.forward).attribute(images, target=classes, normalize=False)[:, 0]
    assert _range_error(ours.double(), theirs).max() < 1e-5  # the float32 model's maps, computed in float64
    # their own float32 maps are another story: the rules are ill-conditioned (docs/methods.md 4)
    assert _range_error(torch.from_numpy(data["float32/map"]), theirs).max() > 1e-2


def test_a_float32_model_gives_its_float64_maps_and_precision_float32_says_what_it_costs():
    model, images = make_model("deit_tiny")
    before = model_state(model)
    targets = torch.tensor([3, 7])
    reference = TransformerAttribution(copy.deepcopy(model).double()).attribute(images.double(), target=targets,
                                                                              normalize=False)
    default = TransformerAttribution(model).attribute(images, target=targets, normalize=False)
    assert default.dtype == torch.float32
    assert _range_error(default, reference).max() < 1e-6
    single = TransformerAttribution(model, precision="float32").attribute(images, target=targets, normalize=False)
    assert not torch.equal(single, default)  # the model's own float32: another (rounding-dependent) map
    assert_same_state(before, model_state(model))  # the float64 copy never touched the model


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_every_model_dtype_works(dtype):
    model, images = make_model("vit_reg4")
    targets = torch.tensor([3, 7])
    reference = TransformerAttribution(copy.deepcopy(model).double()).attribute(images.double(), target=targets,
                                                                              normalize=False)
    low = copy.deepcopy(model).to(dtype)
    got = TransformerAttribution(low).attribute(images.to(dtype), target=targets, normalize=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    if dtype == torch.float64:
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-6)
    # a bfloat16 model is explained in float64 on its own (rounded) weights: finite, of the same shape


def test_a_plain_function_is_refused_unless_the_model_dtype_is_used():
    model, images = make_model("vit_reg4")
    with pytest.raises(TypeError, match="forward_func is a plain function.*precision='float32'"):
        TransformerAttribution(lambda x: model(x), vit=model).attribute(images, target=1)
    TransformerAttribution(lambda x: model(x), vit=model, precision="float32").attribute(images, target=1)
    with pytest.raises(ValueError, match="precision must be one of 'auto', 'float64', 'float32'"):
        TransformerAttribution(model, precision="half")

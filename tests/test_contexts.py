"""Real-code contexts: LoRA, hooks, patched forwards, torch.compile, inference_mode,
gradient checkpointing, train mode, distilled training, unsupported families."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_same_state, make_model, model_state
from torch import nn

from captum_vit import AttentionGuidedGradCAM, AttentionRollout, GradientRollout, LayerReciproCAM

TOL = dict(atol=1e-5, rtol=1e-5)
ATTENTION_METHODS = (AttentionGuidedGradCAM, AttentionRollout, GradientRollout)


class LoRALinear(nn.Linear):
    """A LoRA-style ``qkv``: ``x W^T + b + x A^T B^T``, as peft and timm fine-tunes add."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(3)
        self.lora_a = nn.Parameter(0.3 * torch.randn(rank, base.in_features, generator=g))
        self.lora_b = nn.Parameter(0.3 * torch.randn(base.out_features, rank, generator=g))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


def _maps(model, **kw):
    return LayerReciproCAM(model, model.blocks[-1]).attribute(kw.pop("images"), target=[1, 2], normalize=False, **kw)


def test_lora_qkv_takes_the_exact_fast_path():
    model, images = make_model("deit_tiny")
    model.blocks[-1].attn.qkv = LoRALinear(model.blocks[-1].attn.qkv).eval()
    before = model_state(model)
    explainer = LayerReciproCAM(model, model.blocks[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = explainer.attribute(images, target=[1, 2], normalize=False)
    assert explainer.last_path == "fast"
    general = explainer.attribute(images, target=[1, 2], normalize=False, path="general")
    torch.testing.assert_close(fast, general, **TOL)
    for cls in ATTENTION_METHODS:  # the explicit attention calls the LoRA module itself
        cls(model).attribute(images, target=1)
    assert_same_state(before, model_state(model))


def test_hook_on_attention_falls_back_to_the_general_path_or_is_refused():
    model, images = make_model("deit_tiny")
    general = _maps(model, images=images, path="general")
    handle = model.blocks[-1].attn.register_forward_hook(lambda m, a, out: out * 1.5)
    try:
        reference = _maps(model, images=images, path="general")  # the hook acts on the general path
        assert not torch.allclose(reference, general)
        explainer = LayerReciproCAM(model, model.blocks[-1])
        with pytest.warns(UserWarning, match="fast path not used.*forward hook on the attention module"):
            auto = explainer.attribute(images, target=[1, 2], normalize=False)
        assert explainer.last_path == "general"
        torch.testing.assert_close(auto, reference, **TOL)
        with pytest.raises(ValueError, match="path='fast' is not exact"):
            explainer.attribute(images, path="fast")
        before = model_state(model)
        for cls in ATTENTION_METHODS:
            with pytest.raises(TypeError, match=r"does not reproduce Attention of model.blocks\[11\].*forward hook"):
                cls(model).attribute(images, target=1)
        assert_same_state(before, model_state(model))
    finally:
        handle.remove()
    # once the hook is gone, the explainer proves the fast path again
    assert explainer.fast_path_unavailable_reason() is None
    explainer.attribute(images, target=[1, 2])
    assert explainer.last_path == "fast"


def test_patched_attention_forward_falls_back_or_is_refused():
    model, images = make_model("vit_reg4")
    attn = model.blocks[-1].attn
    original = attn.forward
    attn.forward = lambda x, **kw: original(x, **kw) * 1.5  # a monkey-patched forward (a constant shift would
    # vanish in the next LayerNorm, so the fast path would rightly stay exact)
    try:
        before = model_state(model)
        reference = _maps(model, images=images, path="general")
        explainer = LayerReciproCAM(model, model.blocks[-1])
        with pytest.warns(UserWarning, match="patched attention forward"):
            auto = explainer.attribute(images, target=[1, 2], normalize=False)
        torch.testing.assert_close(auto, reference, **TOL)
        with pytest.raises(TypeError, match="patched forward"):
            AttentionGuidedGradCAM(model).attribute(images)
        assert_same_state(before, model_state(model))
    finally:
        del attn.forward


def test_user_hook_on_the_explained_block_is_refused_not_ignored():
    model, images = make_model("vit_reg4")
    handle = model.blocks[-1].register_forward_hook(lambda m, a, out: out * 2)
    try:
        before = model_state(model)
        with pytest.raises(TypeError, match=r"model.blocks\[2\] has 1 forward hook\(s\) of its own"):
            LayerReciproCAM(model, model.blocks[-1]).attribute(images)
        assert_same_state(before, model_state(model))
    finally:
        handle.remove()


def test_an_error_in_forward_func_does_not_disable_the_fast_path():
    model, images = make_model("deit_tiny")
    def flaky(x, fail):
        if fail:
            raise RuntimeError("user code failed")
        return model(x)

    explainer = LayerReciproCAM(flaky, model.blocks[-1], vit=model)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="user code failed"):
        explainer.attribute(images, additional_forward_args=(True,))
    assert_same_state(before, model_state(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer.attribute(images, additional_forward_args=(False,))
    assert explainer.last_path == "fast"


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compiled_models_are_explained_through_their_eager_module(backend):
    model, images = make_model("deit_tiny_distilled")
    compiled = torch.compile(model, backend=backend)
    before = model_state(model)
    torch.testing.assert_close(
        LayerReciproCAM(compiled, compiled.blocks[-1]).attribute(images, target=[1, 2]),
        LayerReciproCAM(model, model.blocks[-1]).attribute(images, target=[1, 2]),
    )
    for cls in ATTENTION_METHODS:
        torch.testing.assert_close(cls(compiled).attribute(images, target=3), cls(model).attribute(images, target=3))
    assert_same_state(before, model_state(model))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = compiled

        def forward(self, x):
            return self.vit(x)

    with pytest.raises(TypeError, match="vit inside Wrapper is compiled with torch.compile.*vit._orig_mod"):
        LayerReciproCAM(Wrapper(), model.blocks[-1])


def test_inference_mode():
    model, images = make_model("vit_reg4")
    expected = LayerReciproCAM(model, model.blocks[-1]).attribute(images, target=1)
    before = model_state(model)
    with torch.inference_mode():
        inference_images = images.clone()
        torch.testing.assert_close(LayerReciproCAM(model, model.blocks[-1]).attribute(images, target=1), expected)
        torch.testing.assert_close(AttentionRollout(model).attribute(images), AttentionRollout(model).attribute(images))
        for cls in (AttentionGuidedGradCAM, GradientRollout):
            with pytest.raises(RuntimeError, match=r"needs gradients.*inference_mode.*torch.no_grad\(\) it works"):
                cls(model).attribute(images, target=1)
    for cls in (AttentionGuidedGradCAM, GradientRollout):  # tensors made under inference_mode, explained outside
        torch.testing.assert_close(cls(model).attribute(inference_images, target=1), cls(model).attribute(images, target=1))
    assert_same_state(before, model_state(model))


def test_gradient_checkpointing_is_switched_off_and_restored():
    model, images = make_model("vit_reg4")
    expected = {cls: cls(model).attribute(images, target=2) for cls in ATTENTION_METHODS}
    model.set_grad_checkpointing(True)
    before = model_state(model)
    for cls in ATTENTION_METHODS:
        torch.testing.assert_close(cls(model).attribute(images, target=2), expected[cls])
        assert model.grad_checkpointing is True
    LayerReciproCAM(model, model.blocks[-1]).attribute(images)
    assert model.grad_checkpointing is True
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("cls", [LayerReciproCAM, *ATTENTION_METHODS])
def test_every_method_warns_in_train_mode(cls):
    model, images = make_model("vit_reg4")
    model.train()
    before = model_state(model)
    explainer = cls(model, model.blocks[-1]) if cls is LayerReciproCAM else cls(model)
    with pytest.warns(UserWarning, match="training mode"):
        explainer.attribute(images, target=1)
    assert_same_state(before, model_state(model))


def test_distilled_training_mode_is_refused_and_tuples_are_not_half_explained():
    model, images = make_model("deit_tiny_distilled")
    model.set_distilled_training(True)
    model.train()
    before = model_state(model)
    for explainer in (LayerReciproCAM(model, model.blocks[-1]), AttentionGuidedGradCAM(model)):
        with pytest.raises(TypeError, match=r"distilled-training mode.*model.eval\(\)"):
            explainer.attribute(images, target=1)
    assert_same_state(before, model_state(model))
    model.eval()
    both = LayerReciproCAM(lambda x: (model(x), model(x)), model.blocks[-1], vit=model)
    with pytest.raises(ValueError, match="returned 2 outputs"):
        both.attribute(images, path="general")


def test_windowed_and_unknown_models_are_refused_with_the_supported_list():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    swin_v2 = SwinTransformerV2(img_size=64, patch_size=8, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4)
    with pytest.raises(TypeError, match=r"SwinTransformerV2.*windowed or hierarchical.*Supported families: timm"):
        AttentionGuidedGradCAM(swin_v2)
    with pytest.raises(TypeError, match="no supported Vision Transformer was found in Conv2d.*torchvision"):
        LayerReciproCAM(nn.Conv2d(3, 3, 3), nn.Identity())

"""CLIP zero-shot predictions explained with prompts as targets (captum_vit.clip).

The maps themselves are checked against literal references in test_families.py (the two zero-shot families);
here: the classifier's logits are the libraries' own, targets are prompt indices, the model is left as found,
bad arguments are named.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state
from families import PROMPTS, SIZE, hf_clip_model, word_tokenizer

from captum_vit import AttentionGuidedGradCAM, LayerReciproCAM
from captum_vit.clip import ZeroShotClassifier

IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _open_clip_model(**kw):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=16, image_size=SIZE),
                text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1), **kw).eval()


@pytest.mark.parametrize("bias", [None, -3.0], ids=["clip", "siglip-style bias"])
def test_open_clip_logits_are_the_models_own(bias):
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    model = _open_clip_model(init_logit_bias=bias)
    tokenizer = SimpleTokenizer(context_length=16)
    classifier = ZeroShotClassifier.from_open_clip(model, PROMPTS[:3], tokenizer)
    with torch.no_grad():
        image, text, scale, *rest = model(IMAGES, tokenizer(PROMPTS[:3]))  # normalised features, exp'd scale
        expected = scale * image @ text.T + (rest[0] if rest else 0.0)
        torch.testing.assert_close(classifier(IMAGES), expected, rtol=1e-5, atol=1e-5)
    assert classifier.image_encoder is model.visual and classifier.class_names == PROMPTS[:3]


def test_transformers_logits_are_the_models_logits_per_image():
    pytest.importorskip("transformers")
    model = hf_clip_model()
    classifier = ZeroShotClassifier.from_transformers(model, PROMPTS, word_tokenizer)
    with torch.no_grad():
        expected = model(pixel_values=IMAGES, **word_tokenizer(PROMPTS)).logits_per_image
        torch.testing.assert_close(classifier(IMAGES), expected, rtol=1e-5, atol=1e-5)
    assert classifier.num_prompts == len(PROMPTS)


def test_prompt_indices_are_targets_and_the_model_is_left_as_found():
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    model = _open_clip_model()
    classifier = ZeroShotClassifier.from_open_clip(model, PROMPTS[:4], SimpleTokenizer(context_length=16))
    before = model_state(model)
    cam = LayerReciproCAM(classifier, model.visual.transformer.resblocks[-1])
    every = cam.attribute_all_classes(IMAGES, normalize=False)  # (B, prompts, h, w)
    per_prompt = cam.attribute(IMAGES, target=[3, 1], normalize=False)
    torch.testing.assert_close(per_prompt[:, 0], every[torch.arange(2), torch.tensor([3, 1])])
    assert every.shape == (2, 4, SIZE // 16, SIZE // 16)
    assert AttentionGuidedGradCAM(classifier).attribute(IMAGES, target=2).shape == (2, 1, SIZE // 16, SIZE // 16)
    assert_same_state(before, model_state(model))


def test_bad_arguments_are_named():
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    model = _open_clip_model()
    with pytest.raises(TypeError, match="prompts must be a non-empty list of strings"):
        ZeroShotClassifier.from_open_clip(model, "a photo of a cat", SimpleTokenizer(context_length=16))
    with pytest.raises(TypeError, match="open_clip CLIP model.*from_transformers"):
        ZeroShotClassifier.from_open_clip(torch.nn.Linear(2, 2), PROMPTS, SimpleTokenizer())
    with pytest.raises(TypeError, match="transformers CLIPModel.*from_open_clip"):
        ZeroShotClassifier.from_transformers(model, PROMPTS, SimpleTokenizer())
    with pytest.raises(ValueError, match="3 prompts for 2 prompt embeddings"):
        ZeroShotClassifier(model.visual, torch.randn(2, 32), logit_scale=100.0, prompts=PROMPTS[:3])
    with pytest.raises(ValueError, match=r"prompt_embeddings must be \(num_prompts, dim\)"):
        ZeroShotClassifier(model.visual, torch.randn(32), logit_scale=100.0)

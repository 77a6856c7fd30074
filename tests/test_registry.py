"""The method registry: one entry per method, each builds its explainer; the table in its docstring is the registry."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_model

from captum_vit import UnsupportedModelError, methods
from captum_vit.cli import build_parser


def _docstring_table():
    rows = re.findall(r"^(\S+)\s{2,}(.+?)\s{2,}\(B, 1, [hH], [wW]\)$", methods.__doc__, flags=re.M)
    return [name for name, _ in rows if name not in ("name",)]


def test_the_docstring_table_lists_every_entry_in_order():
    assert _docstring_table() == list(methods.METHODS)


def test_the_cli_offers_every_explainer_and_no_control():
    parser = build_parser()
    explain = parser._subparsers._group_actions[0].choices["explain"]
    choices = next(a.choices for a in explain._actions if a.dest == "method")
    assert tuple(choices) == methods.EXPLAINERS
    assert "random" in methods.METHODS and "random" not in choices


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_entry_builds_and_explains(name):
    model, images = make_model("vit_reg4")
    explain = methods.explainer(name, model, ig_steps=4)
    assert explain.name == name and explain.identity.startswith(name)
    maps = explain(images, torch.tensor([1, 2]))
    assert maps.shape[:2] == (2, 1) and torch.isfinite(maps).all()


def test_identities_name_the_options_that_change_maps():
    model, _ = make_model("vit_reg4")
    default = methods.explainer("reciprocam", model).identity
    assert "block=-3" in default and "kernel='dirac'" in default and "residual='input'" in default
    assert "scores='logits'" in default
    authors = methods.explainer("reciprocam-authors", model).identity
    assert "block=-2" in authors and "residual='unmasked'" in authors
    assert methods.explainer("reciprocam", model, normalize=False).identity != default
    assert "block=-1" in methods.explainer("reciprocam-fast", model).identity


def test_an_entry_for_a_block_the_model_lacks_says_what_to_use():
    from timm.models.vision_transformer import VisionTransformer

    one_block = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()
    with pytest.raises(UnsupportedModelError, match="has 1 block.*'reciprocam-fast'"):
        methods.explainer("reciprocam", one_block)
    methods.explainer("reciprocam-fast", one_block)(torch.randn(1, 3, 32, 32), None)


def test_unknown_names_list_the_registry():
    model, _ = make_model("vit_reg4")
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+\\+'; choose one of reciprocam, "):
        methods.explainer("gradcam++", model)


@pytest.mark.parametrize(("name", "option", "value"), [
    ("reciprocam", "kernel", "gausian"), ("reciprocam-authors", "residual", "masked"),
    ("attnlrp", "attention_rule", "CP"), ("legrad", "pooling", "max"),
])
def test_a_misspelt_choice_is_refused_when_the_method_is_built(name, option, value):
    """Enumerated options (the registry's OptionSpec choices) are checked before anything runs."""
    model, _ = make_model("vit_reg4")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=f"{option} must be one of .*got {value!r}"):
        methods.explainer(name, model, **{option: value})
    assert not calls

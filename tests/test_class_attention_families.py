"""CaiT and XCiT: the blocks ViT-ReciproCAM masks carry no class token (it joins in class-attention blocks at the
end). ``test_families.py`` covers every residual and block; here: other image sizes and what is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state
from families import build, literal_reciprocam

from captum_vit import AttentionRollout, LayerReciproCAM, UnsupportedModelError

TOL = dict(atol=1e-5, rtol=1e-5)
XCIT, CAIT = "timm XCiT (cross-covariance attention)", "timm CaiT (class attention after the blocks)"


def test_xcit_grid_follows_its_convolutional_patch_embedding():
    """72x72 images: four stride-2 3x3 convolutions give a 5x5 grid (72, 36, 18, 9, 5)."""
    model, blocks, _ = build(XCIT)
    before = model_state(model)
    x = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(3))
    got = LayerReciproCAM(model, blocks[1]).attribute(x, target=4, normalize=False, scores="logits")
    assert got.shape == (1, 1, 5, 5)
    torch.testing.assert_close(got[0, 0], literal_reciprocam(model, blocks[1], x[0], 0, scores="logits",
                                                             grid=(5, 5))[4], **TOL)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name, token_blocks", [(CAIT, "blocks_token_only"), (XCIT, "cls_attn_blocks")])
def test_class_attention_blocks_are_refused_by_name(name, token_blocks):
    model, _, _ = build(name)
    block = getattr(model, token_blocks)[0]
    with pytest.raises(UnsupportedModelError, match="not one of its .* blocks; pass a block"):
        LayerReciproCAM(model, block)
    with pytest.raises(UnsupportedModelError, match="AttentionRollout is not defined for .*class token joins only"):
        AttentionRollout(model)

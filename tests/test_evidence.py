"""Known-evidence canvases: the label is decided by the marks, whose boxes are exact."""

from __future__ import annotations

import pytest
import torch

from captum_vit.evidence import CLASSES, MARK, MARK_COLOURS, denormalize, make_canvases

BACKGROUNDS = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant, decisive, distractors", [("single", 1, 0), ("pair", 2, 0), ("distractor", 1, 1)])
def test_marks_decide_the_labels_and_sit_in_their_boxes(variant, decisive, distractors):
    batch = make_canvases(BACKGROUNDS, variant, 40, seed=3)
    assert batch.images.shape == (40, 3, 64, 64) and batch.labels.shape == (40, len(CLASSES))
    pixels = denormalize(batch.images)
    for i in range(40):
        assert len(batch.boxes[i]) == decisive and len(batch.distractors[i]) == distractors
        assert sorted(c for c, _ in batch.boxes[i]) == batch.labels[i].nonzero()[:, 0].tolist()
        for c, (x0, y0, x1, y1) in batch.boxes[i]:
            assert x1 - x0 == MARK and y1 - y0 == MARK and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            inner = pixels[i, :, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
            torch.testing.assert_close(inner, torch.tensor(MARK_COLOURS[c][1]).view(3, 1, 1).expand_as(inner))
            assert pixels[i, :, y0, x0:x1].abs().max() == 0  # the black border
        for c, (x0, y0, x1, y1) in batch.distractors[i]:
            assert c not in [d for d, _ in batch.boxes[i]]  # another colour than the decisive mark
            ring = pixels[i, :, y0, x0:x1]
            torch.testing.assert_close(ring, torch.tensor(MARK_COLOURS[c][1]).view(3, 1).expand_as(ring))
    masks = batch.box_masks()
    assert masks.shape == (40, len(CLASSES), 64, 64)
    assert (masks.flatten(2).sum(2) == batch.labels * MARK * MARK).all()


def test_canvases_are_reproducible_and_differ_across_seeds():
    a, b = make_canvases(BACKGROUNDS, "pair", 8, seed=5), make_canvases(BACKGROUNDS, "pair", 8, seed=5)
    assert torch.equal(a.images, b.images) and a.boxes == b.boxes
    assert not torch.equal(a.images, make_canvases(BACKGROUNDS, "pair", 8, seed=6).images)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="variant must be one of single, pair, distractor"):
        make_canvases(BACKGROUNDS, "triple", 2)
    with pytest.raises(ValueError, match=r"backgrounds must be \(M, 3, h, w\)"):
        make_canvases(BACKGROUNDS[:, 0], "single", 2)

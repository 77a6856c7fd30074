"""LayerReciproCAM against maps the ViT-ReciproCAM authors' own code produced.

``tests/data/vitcam_reference.npz`` holds what the authors' repository
(github ``sybyun/vitcam`` at c7018ee, ``src/vit_recipro_cam.py``, run unedited
by ``benchmarks/authors_reference.py``) computed on the embedded CIFAR-10
DeiT-Tiny for the eight bundled images: its normalised maps and the raw class
probabilities of its masked copies, for its defaults (block -2, gaussian,
class token kept), dirac, the class token masked, and block -3. Their hook
replaces ``norm1``'s output, so the block's skip connection carries the
unmasked input: ``residual="unmasked"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captum_vit import LayerReciproCAM
from captum_vit.models import default_model

DATA = Path(__file__).resolve().parent / "data" / "vitcam_reference.npz"
#: setting -> (block, kernel, keep_prefix_tokens), as the authors' constructor arguments
SETTINGS = {
    "block-2_gaussian": (-2, "gaussian", True),
    "block-2_dirac": (-2, "dirac", True),
    "block-2_gaussian_no_cls": (-2, "gaussian", False),
    "block-3_gaussian": (-3, "gaussian", True),
}


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(DATA))


@pytest.fixture(scope="module")
def loaded():
    return default_model()


RAW_TOLERANCE = 2e-6  # float32 rounding of the class probabilities


def _check(reference, setting, raw, rows):
    theirs_raw = torch.from_numpy(reference[f"{setting}/raw"][rows])
    torch.testing.assert_close(raw[:, 0], theirs_raw, atol=RAW_TOLERANCE, rtol=1e-4)
    theirs = torch.from_numpy(reference[f"{setting}/map"][rows])
    flat = raw[:, 0].flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    ours = (raw[:, 0] - lo[:, None, None]) / (hi - lo)[:, None, None]
    # min-max scaling divides the rounding by each map's range (down to 1e-4 here)
    tolerance = (3 * RAW_TOLERANCE / (hi - lo))[:, None, None]
    assert ((ours - theirs).abs() <= tolerance).all(), f"{setting}: normalised maps differ beyond their rounding"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fast_path_equals_the_authors_code(reference, loaded, setting):
    block, kernel, keep = SETTINGS[setting]
    images = torch.from_numpy(reference["images"])
    cam = LayerReciproCAM(loaded.forward, loaded.vit.blocks[block])
    # target None: the predicted class, as their code explains
    raw = cam.attribute(images, normalize=False, kernel=kernel, keep_prefix_tokens=keep, residual="unmasked")
    assert cam.last_path == "fast"
    assert torch.equal(loaded.forward(images).argmax(1), torch.from_numpy(reference[f"{setting}/class"]))
    _check(reference, setting, raw, slice(None))


def test_general_path_and_default_options_equal_the_authors_code(reference, loaded):
    setting = "block-2_gaussian"
    rows = slice(0, 2)
    images = torch.from_numpy(reference["images"][rows])
    cam = LayerReciproCAM(loaded.forward, loaded.vit.blocks[-2])
    raw = cam.attribute(images, target=torch.from_numpy(reference[f"{setting}/class"][rows]), normalize=False,
                        path="general")  # every option at its default: the authors' settings
    _check(reference, setting, raw, rows)

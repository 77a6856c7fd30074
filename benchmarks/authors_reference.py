"""Maps of the ViT-ReciproCAM authors' own code on the embedded model, saved as test data.

Runs ``ViTReciproCam`` from the authors' repository (github ``sybyun/vitcam``,
``src/vit_recipro_cam.py``, the implementation the paper names as official),
unedited and outside this project, on the embedded CIFAR-10 DeiT-Tiny
(``captum_vit.models.default_model``; the ViT is fed the bundled images
upsampled to 224 x 224 as its ``forward`` does) for every bundled image, and
writes ``tests/data/vitcam_reference.npz``: per setting, the authors'
normalised map (what their ``__call__`` returns), the raw class probabilities
of the masked copies their hooked model produced, and the class explained.
``tests/test_authors_reference.py`` compares ``LayerReciproCAM`` with them.

    git clone https://github.com/sybyun/vitcam /tmp/vitcam     # or any copy of the repository
    python benchmarks/authors_reference.py --vitcam /tmp/vitcam/src

Settings: the repository's defaults (block -2, gaussian, class token kept),
dirac, the class token masked, and block -3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.models import default_model, sample_images  # noqa: E402

#: name -> the authors' constructor arguments
SETTINGS = {
    "block-2_gaussian": dict(block_index=-2, is_gaussian=True, cls_token=True),
    "block-2_dirac": dict(block_index=-2, is_gaussian=False, cls_token=True),
    "block-2_gaussian_no_cls": dict(block_index=-2, is_gaussian=True, cls_token=False),
    "block-3_gaussian": dict(block_index=-3, is_gaussian=True, cls_token=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vitcam", required=True, help="the src/ folder of the authors' repository")
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "vitcam_reference.npz"))
    args = parser.parse_args()
    sys.path.insert(0, args.vitcam)
    from vit_recipro_cam import ViTReciproCam  # the authors' class, imported from their checkout

    torch.manual_seed(0)
    loaded = default_model()
    pictures, _ = sample_images()
    images = torch.cat([loaded.preprocess(p) for p in pictures])
    size = loaded.forward.img_size
    arrays = {"images": images.numpy()}
    for name, options in SETTINGS.items():
        cam = ViTReciproCam(loaded.vit, "cpu", **options)
        maps, raws, classes = [], [], []
        for image in images:
            x = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)
            with torch.no_grad():
                normalised, index = cam(x)
                probabilities = torch.softmax(cam.model(x), dim=1)  # what their __call__ computes before scaling
            maps.append(normalised.numpy())
            raws.append(probabilities[1:, index].reshape(normalised.shape).numpy())
            classes.append(index)
        arrays[f"{name}/map"] = np.stack(maps).astype(np.float32)
        arrays[f"{name}/raw"] = np.stack(raws).astype(np.float32)
        arrays[f"{name}/class"] = np.array(classes)
        print(f"{name}: classes {classes}, raw range {np.ptp(arrays[f'{name}/raw'], axis=(1, 2)).min():.2e} (smallest)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"written to {out}")


if __name__ == "__main__":
    main()

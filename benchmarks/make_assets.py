"""Build captum_vit/assets: the embedded default checkpoint and the demo images.

    python benchmarks/make_assets.py --shared ../shared

Copies the 224-pixel DeiT-Tiny CIFAR-10 checkpoint and picks, for a few
classes, the first CIFAR-10 test image the model classifies correctly with
probability >= 0.8, saved as 32x32 PNG with ``samples.json`` (file, label).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.data import CIFAR10JPEG  # noqa: E402
from captum_vit.models import ASSETS, CIFAR10_CLASSES, load_cifar_checkpoint  # noqa: E402

CLASSES = ("cat", "dog", "ship", "horse", "airplane", "truck", "bird", "frog")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args()
    shared = Path(args.shared)
    source = shared / "models" / "deit_tiny_p16_224.safetensors"
    ASSETS.mkdir(exist_ok=True)
    shutil.copyfile(source, ASSETS / source.name)
    model = load_cifar_checkpoint(ASSETS / source.name).forward
    data = CIFAR10JPEG(shared / "data" / "cifar10_jpeg.npz", "test")
    samples_dir = ASSETS / "samples"
    samples_dir.mkdir(exist_ok=True)
    index = []
    for name in CLASSES:
        label = CIFAR10_CLASSES.index(name)
        for i in torch.nonzero(data.labels == label)[:, 0].tolist():
            with torch.no_grad():
                probs = model(data[i][0][None]).softmax(-1)[0]
            if probs.argmax() == label and probs[label] >= args.threshold:
                file = f"{name}_test{i}.png"
                data.image(i).save(samples_dir / file)
                index.append({"file": file, "label": label, "class": name, "test_index": i,
                              "probability": round(float(probs[label]), 4)})
                print(f"{name}: test image {i}, p={probs[label]:.3f}")
                break
    (samples_dir / "samples.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Images per second of the evaluation runner (`captum_vit.metrics.evaluate`) on the embedded DeiT-Tiny.

CIFAR-10 test pictures spread over the classes, the model's own transform, ADCC, one thread; each method
is run once to warm up, then timed once. The data is the project's ``cifar10_jpeg.npz`` (JPEG bytes with
offsets; CIFAR-10 itself from https://www.cs.toronto.edu/~kriz/cifar.html packs the same way):

    python benchmarks/runner_speed.py --data ../shared/data/cifar10_jpeg.npz --methods reciprocam-fast,reciprocam
"""

from __future__ import annotations

import argparse
import io
import time
import warnings

import numpy as np
import torch
from PIL import Image

from captum_vit.metrics import evaluate
from captum_vit.models import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="cifar10_jpeg.npz")
    parser.add_argument("--methods", default="reciprocam-fast,reciprocam")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # flat-map warnings of an untrained-looking picture are not the subject here
    torch.set_num_threads(args.threads)
    loaded = default_model()
    packed = np.load(args.data)
    jpeg, offsets = packed["test_jpeg"], packed["test_offsets"]
    chosen = np.linspace(0, len(offsets) - 2, args.images).astype(int)
    pictures = [Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB") for i in chosen]
    data = torch.utils.data.TensorDataset(torch.stack([loaded.transform(p) for p in pictures]))
    for method in args.methods.split(","):
        evaluate(loaded.forward, [method], data, ["adcc"], batch_size=args.batch, progress=False)
        start = time.perf_counter()
        evaluate(loaded.forward, [method], data, ["adcc"], batch_size=args.batch, progress=False)
        print(f"{method}: {args.images / (time.perf_counter() - start):.2f} images/s")


if __name__ == "__main__":
    main()

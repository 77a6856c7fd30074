"""Images in, normalised tensors out; the CIFAR-10 JPEG archive used by the benchmarks.

The archive (``cifar10_jpeg.npz``: ``train_jpeg``, ``train_offsets``,
``y_train``, ``test_*``, ``classes``) holds CIFAR-10 as JPEG bytes. Anyone
without it can build one from the official CIFAR-10 python batches with
:func:`write_cifar10_npz`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .models import CIFAR10_MEAN, CIFAR10_STD

DEFAULT_CIFAR_NPZ = Path("../shared/data/cifar10_jpeg.npz")


def pil_to_tensor(image, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A PIL image or path -> normalised ``(3, H, W)`` float tensor (bicubic resize)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
        except (OSError, ValueError) as err:
            raise ValueError(f"{image} is not a readable image ({err}).") from None
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((int(size[1]), int(size[0])), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def denormalize(x: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """Undo normalisation: ``(..., 3, H, W)`` -> pixels in ``[0, 1]``."""
    m = torch.tensor(mean, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)


class CIFAR10JPEG(Dataset):
    """CIFAR-10 from the JPEG archive: items are ``(normalised (3, 32, 32), label)``."""

    def __init__(self, path: str | Path = DEFAULT_CIFAR_NPZ, split: str = "test") -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found. Build it from the CIFAR-10 python batches with "
                "captum_vit.data.write_cifar10_npz, or pass --data PATH."
            )
        if split not in ("train", "test"):
            raise ValueError("split must be 'train' or 'test'.")
        try:
            archive = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} cannot be read as an .npz archive ({type(err).__name__}).") from None
        needed = (f"{split}_jpeg", f"{split}_offsets", f"y_{split}", "classes")
        missing = [k for k in needed if k not in getattr(archive, "files", ())]
        if missing:
            raise ValueError(
                f"{path} is not a CIFAR-10 JPEG archive: it lacks {', '.join(missing)} "
                "(captum_vit.data.write_cifar10_npz builds one)."
            )
        self.jpeg = archive[f"{split}_jpeg"]
        self.offsets = archive[f"{split}_offsets"]
        self.labels = torch.from_numpy(archive[f"y_{split}"].astype(np.int64))
        self.classes = [str(c) for c in archive["classes"]]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, i: int):
        from PIL import Image

        return Image.open(io.BytesIO(self.jpeg[self.offsets[i] : self.offsets[i + 1]].tobytes())).convert("RGB")

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return pil_to_tensor(self.image(i), (32, 32), CIFAR10_MEAN, CIFAR10_STD), int(self.labels[i])

    def balanced_indices(self, per_class: int) -> list:
        """The first ``per_class`` examples of every class (the archive is sorted by class)."""
        out = []
        for c in range(len(self.classes)):
            out.extend(torch.nonzero(self.labels == c)[:per_class, 0].tolist())
        return out


def write_cifar10_npz(batches_dir: str | Path, out: str | Path, quality: int = 95) -> None:
    """Build ``cifar10_jpeg.npz`` from the official ``cifar-10-batches-py`` folder."""
    import pickle

    from PIL import Image

    batches_dir = Path(batches_dir)

    def read(names):
        xs, ys = [], []
        for name in names:
            with open(batches_dir / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.extend(d[b"labels"])
        return np.concatenate(xs), np.array(ys, dtype=np.uint8)

    arrays = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        x, y = read(names)
        order = np.argsort(y, kind="stable")
        blobs = []
        for img in x[order]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"y_{split}"] = y[order]
    from .models import CIFAR10_CLASSES

    arrays["classes"] = np.array(CIFAR10_CLASSES)
    np.savez(out, **arrays)

"""Images in, normalised tensors out; the CIFAR-10 JPEG archive used by the benchmarks.

The archive (``cifar10_jpeg.npz``: ``train_jpeg``, ``train_offsets``,
``y_train``, ``test_*``, ``classes``) holds CIFAR-10 as JPEG bytes. Anyone
without it can build one from the official CIFAR-10 python batches with
`write_cifar10_npz`.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Union

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


# -- folders, file lists and boxes (captum_vit.metrics.evaluate, ``captum-vit evaluate``) ---------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LABEL_ORDERS = ("names", "sorted")


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def class_index(class_names: Sequence[str]) -> dict:
    """``{normalised name or synonym: index}`` of a model's classes (``"tabby, tabby cat"`` gives both)."""
    index: dict = {}
    for i, name in enumerate(class_names):
        for synonym in {name, *name.split(",")}:
            index.setdefault(_normal(synonym), i)
    return index


def _images_under(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


WORDNET_ID = re.compile(r"^n\d{8}$")


def _imagenet_synsets(folders: Sequence[Path], class_names: Sequence[str]) -> Optional[dict]:
    """``{folder: class}`` when every folder is an ImageNet WordNet id and the model has ImageNet's 1000
    classes (timm's ``ImageNetInfo`` gives the ids in class order); ``None`` otherwise."""
    if len(class_names) != 1000 or not folders or not all(WORDNET_ID.match(f.name) for f in folders):
        return None
    from timm.data import ImageNetInfo

    synsets = {name: k for k, name in enumerate(ImageNetInfo().label_names())}
    if not all(f.name in synsets for f in folders):
        return None
    return {f: synsets[f.name] for f in folders}


def _labelled_folders(root: Path, class_names: Optional[Sequence[str]], label_order: str) -> Tuple[list, list]:
    """``(paths, labels)`` of an ImageFolder tree: one subfolder per class."""
    import difflib

    folders = sorted(p for p in root.iterdir() if p.is_dir() and _images_under(p))
    if label_order == "sorted":
        if class_names is not None and len(folders) > len(class_names):
            raise ValueError(f"{root} has {len(folders)} class folders but the model has {len(class_names)} classes.")
        mapping = {folder: k for k, folder in enumerate(folders)}
    elif class_names is not None and _imagenet_synsets(folders, class_names) is not None:
        mapping = _imagenet_synsets(folders, class_names)  # ImageNet's WordNet-id folders (n01440764, ...)
    else:
        if class_names is None:
            raise ValueError(f"{root}'s class folders cannot be matched to the model's classes by name: the model has "
                             "no class names. Use label_order='sorted' (CLI: --label-order sorted): folder k in sorted "
                             "order is class k.")
        names = class_index(class_names)
        unmatched = [f.name for f in folders if _normal(f.name) not in names]
        if unmatched:
            hint = difflib.get_close_matches(_normal(unmatched[0]), list(names), n=3, cutoff=0.6)
            raise ValueError(
                f"{len(unmatched)} class folder(s) of {root} name no class of the model: {', '.join(unmatched[:5])}"
                + (f" (close: {', '.join(hint)})" if hint else "")
                + ". Rename them, or use label_order='sorted' (CLI: --label-order sorted): folder k is class k."
            )
        mapping = {folder: names[_normal(folder.name)] for folder in folders}
    paths, labels = [], []
    for folder, label in mapping.items():
        for path in _images_under(folder):
            paths.append(path)
            labels.append(label)
    return paths, labels


def read_boxes(path: Union[str, Path]) -> dict:
    """Ground-truth boxes per image from a JSON or CSV file: ``{image key: [(x0, y0, x1, y1), ...]}``.

    JSON: ``{"cat/1.jpg": [[x0, y0, x1, y1], ...], ...}``; CSV: rows
    ``image,x0,y0,x1,y1`` (one box per row, a header row allowed). Keys are
    paths relative to the data folder, or file names; corners in the
    original image's pixels, end exclusive.
    """
    import csv
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"boxes file {path} does not exist.")
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text())
        return {str(k): [tuple(float(v) for v in box) for box in boxes] for k, boxes in raw.items()}
    boxes: dict = {}
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().lower() in ("image", "path", "file", "filename"):
                continue
            if len(row) != 5:
                raise ValueError(f"{path}: rows must be image,x0,y0,x1,y1; got {row!r}.")
            boxes.setdefault(row[0].strip(), []).append(tuple(float(v) for v in row[1:]))
    return boxes


def timm_box_mapping(data_config: dict) -> Callable[[Sequence[float], Tuple[int, int]], Tuple[int, int, int, int]]:
    """Map a box on the original picture to the model's input, as timm's evaluation transform moves pixels.

    timm's default (``crop_mode="center"``): the shorter side resized to
    ``size / crop_pct``, then a centre crop of ``size``. Other crop modes are
    refused (their geometry is not followed here).
    """
    mode = data_config.get("crop_mode") or "center"
    if mode != "center":
        raise ValueError(f"boxes follow timm's centre-crop preprocessing only; this model's crop_mode is {mode!r}.")
    _, crop_h, crop_w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875
    scale_h, scale_w = math.floor(crop_h / crop_pct), math.floor(crop_w / crop_pct)
    if scale_h != scale_w:
        raise ValueError("boxes follow a square preprocessing only (this model's input is not square).")

    def move(box: Sequence[float], image_wh: Tuple[int, int]) -> Tuple[int, int, int, int]:
        W, H = image_wh
        new_w, new_h = (scale_w, int(scale_w * H / W)) if W <= H else (int(scale_h * W / H), scale_h)
        left, top = int(round((new_w - crop_w) / 2.0)), int(round((new_h - crop_h) / 2.0))
        x0, y0, x1, y1 = box
        sx, sy = new_w / W, new_h / H
        clip = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
        return (clip(x0 * sx - left, crop_w), clip(y0 * sy - top, crop_h),
                clip(x1 * sx - left, crop_w), clip(y1 * sy - top, crop_h))

    return move


class ImageFolderDataset(Dataset):
    """Pictures from a folder (an ImageFolder tree of class subfolders, or flat) or a file list, for evaluation.

    Items are ``(image, label, boxes)``: ``image`` through ``transform`` (the
    model's preprocessing) as a ``(C, H, W)`` tensor; ``label`` the class the
    subfolder names (matched to ``class_names`` by name, synonyms and case
    aside; ``label_order="sorted"``: subfolder k in sorted order is class k),
    or -1 without subfolders; ``boxes`` the image's entries of ``boxes``
    mapped to the model's input with ``box_mapping`` (or ``None``).
    Unreadable files are left out and listed in `skipped`.

    Args:
        source: a folder, or a ``.txt`` file of image paths (one per line,
            relative to the file's folder).
        transform: PIL image -> tensor, e.g. ``LoadedModel.transform``.
        class_names: the model's classes, to match subfolders by name.
        label_order: ``"names"`` (default) or ``"sorted"``.
        require_labels: refuse class folders that match no class of the
            model (default); ``False``: read them unlabelled instead (labels
            ``-1``), for runs that explain the predicted class.
        boxes: ``{key: boxes}`` from `read_boxes` (keys: relative path or file name).
        box_mapping: original-picture box -> model-input box
            (`timm_box_mapping`); required with ``boxes``.
        limit: the first ``limit`` readable images only (unreadable ones
            before them are skipped, listed in `skipped`, and not counted).
    """

    def __init__(self, source: Union[str, Path], transform: Callable[[Any], torch.Tensor], *,
                 class_names: Optional[Sequence[str]] = None, label_order: str = "names",
                 require_labels: bool = True,
                 boxes: Optional[dict] = None, box_mapping: Optional[Callable[..., Any]] = None,
                 limit: Optional[int] = None) -> None:
        if label_order not in LABEL_ORDERS:
            raise ValueError(f"label_order must be one of {', '.join(LABEL_ORDERS)}; got {label_order!r}.")
        if boxes is not None and box_mapping is None:
            raise ValueError("boxes need box_mapping, which moves them as the preprocessing moves the pixels.")
        self.root, paths, labels = self._discover(Path(source), class_names, label_order, require_labels)
        self.transform, self.boxes, self.box_mapping = transform, boxes, box_mapping
        self.skipped: list = []
        keep = []
        for i, path in enumerate(paths):  # the limit counts readable images: the ones that will be explained
            if limit is not None and len(keep) >= limit:
                break
            if self._readable(path):
                keep.append(i)
        self.paths, self.labels = [paths[i] for i in keep], [labels[i] for i in keep]
        if not self.paths:
            raise ValueError(f"{source}: no readable images ({', '.join(IMAGE_SUFFIXES)}) found.")

    @staticmethod
    def _discover(source: Path, class_names: Optional[Sequence[str]], label_order: str,
                  require_labels: bool) -> Tuple[Path, list, list]:
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such file or folder.")
        if source.is_file():
            root = source.parent
            lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
            paths = [(root / line) if not Path(line).is_absolute() else Path(line) for line in lines]
            return root, paths, [-1] * len(paths)
        if any(p.is_dir() and _images_under(p) for p in source.iterdir()):
            try:
                paths, labels = _labelled_folders(source, class_names, label_order)
            except ValueError:
                if require_labels:
                    raise
                # the labels are not used: every image, unlabelled, whatever its folders are called
                paths = _images_under(source)
                labels = [-1] * len(paths)
            return source, paths, labels
        paths = _images_under(source)
        return source, paths, [-1] * len(paths)

    def _readable(self, path: Path) -> bool:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.verify()  # the header and structure, without decoding the pixels
            return True
        except (OSError, ValueError, SyntaxError) as err:
            self.skipped.append(f"{path} ({type(err).__name__})")
            return False

    def __len__(self) -> int:
        return len(self.paths)

    def _boxes_of(self, path: Path, image_wh: Tuple[int, int]) -> Optional[list]:
        if self.boxes is None:
            return None
        key = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else path.name
        found = self.boxes.get(key, self.boxes.get(path.name))
        if found is None:
            raise ValueError(f"the boxes file has no entry for {key}; give every image its boxes.")
        return [self.box_mapping(box, image_wh) for box in found]  # type: ignore[misc]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, Optional[list]]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} cannot be decoded ({type(err).__name__}: {err}).") from None
        tensor = self.transform(image)
        return (tensor[0] if tensor.dim() == 4 else tensor), self.labels[index], self._boxes_of(path, image.size)


def image_processor_transform(processor: Any) -> Callable[[Any], torch.Tensor]:
    """A Hugging Face ``transformers`` image processor as a PIL image -> ``(C, H, W)`` tensor transform."""
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]

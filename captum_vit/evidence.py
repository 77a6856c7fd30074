"""Known-evidence data: canvases where the pixels that decide the label are known by construction.

A canvas is a 64x64 image: a CIFAR-10 picture (upsampled 2x) as background,
whose class has nothing to do with the label, and small coloured marks at
random positions. A *decisive* mark is a filled 10x10 square with a black
border; its colour alone decides the label (one of `MARK_COLOURS`). A
*distractor* is a hollow square of another palette colour: the same colours,
but it never counts. With patch size 8 the canvas is an 8x8 token grid and a
mark covers 2x2 or 2x3 or 3x3 patches wherever it lands.

Variants (``variant=``):

- ``"single"``: one decisive mark; the label is its colour.
- ``"pair"``: two decisive marks of two colours; both labels are on
  (multi-label), and the map for each class must land on its own mark.
- ``"distractor"``: one decisive mark and one distractor of another colour.

The generator is deterministic in ``seed``; boxes are exact pixel boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: the decisive classes: name and RGB in [0, 1]
MARK_COLOURS: Tuple[Tuple[str, Tuple[float, float, float]], ...] = (
    ("red", (0.95, 0.1, 0.1)),
    ("green", (0.1, 0.85, 0.1)),
    ("blue", (0.15, 0.25, 0.95)),
    ("yellow", (0.95, 0.9, 0.1)),
    ("magenta", (0.9, 0.1, 0.9)),
    ("cyan", (0.1, 0.9, 0.9)),
)
CLASSES = tuple(name for name, _ in MARK_COLOURS)
CANVAS = 64
MARK = 10
VARIANTS = ("single", "pair", "distractor")
#: inputs are (pixels - 0.5) / 0.25, so 0 is mid-grey
MEAN, STD = 0.5, 0.25

Box = Tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


@dataclass
class EvidenceBatch:
    """Canvases and what decides their labels.

    ``images``: ``(N, 3, 64, 64)`` normalised canvases; ``labels``: ``(N, K)``
    multi-hot decisive classes; ``boxes[i]``: ``(class, box)`` of each decisive
    mark of image ``i``; ``distractors[i]``: the same for its distractor marks.
    """

    images: Tensor
    labels: Tensor
    boxes: List[List[Tuple[int, Box]]]
    distractors: List[List[Tuple[int, Box]]]

    def box_masks(self, height: int = CANVAS, width: int = CANVAS) -> Tensor:
        """``(N, K, H, W)`` bool: the pixels of each class's decisive mark (empty where absent)."""
        masks = torch.zeros(len(self.boxes), len(CLASSES), height, width, dtype=torch.bool)
        for i, marks in enumerate(self.boxes):
            for c, (x0, y0, x1, y1) in marks:
                masks[i, c, y0:y1, x0:x1] = True
        return masks


def _overlaps(a: Box, b: Box, margin: int = 2) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(generator: torch.Generator, taken: List[Box]) -> Box:
    for _ in range(1000):
        x0, y0 = (int(v) for v in torch.randint(0, CANVAS - MARK + 1, (2,), generator=generator))
        box = (x0, y0, x0 + MARK, y0 + MARK)
        if not any(_overlaps(box, t) for t in taken):
            return box
    raise RuntimeError("could not place a mark without overlap")  # pragma: no cover - 64x64 has room for two


def make_canvases(backgrounds: Tensor, variant: str, n: int, seed: int = 0) -> EvidenceBatch:
    """``n`` canvases of ``variant`` on backgrounds drawn from ``backgrounds``.

    Args:
        backgrounds: ``(M, 3, h, w)`` pictures in ``[0, 1]`` (e.g. CIFAR-10,
            32x32); each canvas takes one at random, resized to 64x64.
        variant: ``"single"``, ``"pair"`` or ``"distractor"``.
        n: number of canvases.
        seed: the generator's seed (positions, colours, backgrounds).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}.")
    if backgrounds.dim() != 4 or backgrounds.shape[1] != 3:
        raise ValueError(f"backgrounds must be (M, 3, h, w) pictures in [0, 1]; got {tuple(backgrounds.shape)}.")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, backgrounds.shape[0], (n,), generator=g)
    canvases = F.interpolate(backgrounds[picks].float(), size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)
    canvases = canvases.clamp(0, 1).clone()
    labels = torch.zeros(n, len(CLASSES))
    boxes: List[List[Tuple[int, Box]]] = []
    distractors: List[List[Tuple[int, Box]]] = []
    for i in range(n):
        count = 2 if variant == "pair" else 1
        colours = torch.randperm(len(CLASSES), generator=g)[: count + (variant == "distractor")].tolist()
        taken: List[Box] = []
        decisive: List[Tuple[int, Box]] = []
        for c in colours[:count]:
            box = _place(g, taken)
            taken.append(box)
            decisive.append((c, box))
            _draw_mark(canvases[i], box, MARK_COLOURS[c][1], hollow=False)
            labels[i, c] = 1.0
        others: List[Tuple[int, Box]] = []
        if variant == "distractor":
            c = colours[count]
            box = _place(g, taken)
            others.append((c, box))
            _draw_mark(canvases[i], box, MARK_COLOURS[c][1], hollow=True)
        boxes.append(decisive)
        distractors.append(others)
    return EvidenceBatch((canvases - MEAN) / STD, labels, boxes, distractors)


def _draw_mark(canvas: Tensor, box: Box, colour: Tuple[float, float, float], hollow: bool) -> None:
    """A filled square with a black border (decisive) or a 2-pixel ring of the colour (distractor)."""
    x0, y0, x1, y1 = box
    rgb = torch.tensor(colour).view(3, 1, 1)
    if hollow:
        inside = canvas[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].clone()
        canvas[:, y0:y1, x0:x1] = rgb
        canvas[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = inside
    else:
        canvas[:, y0:y1, x0:x1] = 0.0
        canvas[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = rgb


def denormalize(images: Tensor) -> Tensor:
    """Canvases back to pixels in ``[0, 1]``."""
    return (images * STD + MEAN).clamp(0, 1)


def evidence_backgrounds(npz: Optional[str] = None, split: str = "train", limit: int = 5000) -> Tensor:
    """``(M, 3, 32, 32)`` CIFAR-10 pictures in ``[0, 1]`` from the JPEG archive (see `captum_vit.data`)."""
    import numpy as np

    from .data import CIFAR10JPEG

    dataset = CIFAR10JPEG(npz, split) if npz is not None else CIFAR10JPEG(split=split)
    step = max(1, len(dataset) // limit)  # the archive is sorted by class: take every step-th
    pictures = [np.asarray(dataset.image(i), dtype=np.float32) / 255.0 for i in range(0, len(dataset), step)][:limit]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()


#: the known-evidence models trained by ``benchmarks/train_evidence.py``: name -> VisionTransformer
#: arguments beyond the shared ones (64x64 canvases, patch 8, width 96, 3 heads, MLP ratio 2, 6 classes).
#: ``distilled=True`` builds timm's DeiT ``VisionTransformerDistilled`` (class + distillation token,
#: two heads averaged at inference); the others are timm's ``VisionTransformer``.
EVIDENCE_MODELS = {
    "cls4": dict(depth=4),
    "cls8": dict(depth=8),
    "dist4": dict(depth=4, distilled=True),
    "reg4": dict(depth=4, reg_tokens=4),
}


def build_evidence_model(name: str):
    """An untrained known-evidence ViT (see `EVIDENCE_MODELS`)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if name not in EVIDENCE_MODELS:
        raise ValueError(f"unknown known-evidence model {name!r}; choose one of {', '.join(EVIDENCE_MODELS)}.")
    arguments = dict(EVIDENCE_MODELS[name])
    family = VisionTransformerDistilled if arguments.pop("distilled", False) else VisionTransformer
    return family(img_size=CANVAS, patch_size=8, embed_dim=96, num_heads=3, mlp_ratio=2.0,
                  num_classes=len(CLASSES), **arguments)


def load_evidence_model(name: str):
    """A trained known-evidence ViT from ``captum_vit/assets/evidence`` (fp16 weights -> float32, eval mode)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(__file__).resolve().parent / "assets" / "evidence" / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; train it with benchmarks/train_evidence.py --models {name}.")
    model = build_evidence_model(name)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()

"""Known-evidence data: canvases where the pixels that decide the label are known by construction.

A canvas is a 64x64 image: a CIFAR-10 picture (upsampled 2x) as background,
whose class has nothing to do with the label, and small coloured marks at
random positions. A *decisive* mark is a filled 10x10 square with a black
border; its colour alone decides the label (one of `MARK_COLOURS`). A
*distractor* is a hollow square of another palette colour: the same colours,
but it never counts. With patch size 8 the canvas is an 8x8 token grid and a
mark covers 2x2 or 2x3 or 3x3 patches wherever it lands.

Two tasks. *Marks* (`make_canvases`, six classes, the canvases above) and
*objects* (`make_object_canvases`, ten classes): a 32x32 CIFAR-10 picture
pasted at a random place on a 64x64 canvas whose background is a texture or
another CIFAR-10 picture (upsampled 2x); the label is the pasted picture's
class and the ground truth its box.

Variants of the marks task (``variant=``):

- ``"single"``: one decisive mark; the label is its colour.
- ``"pair"``: two decisive marks of two colours; both labels are on
  (multi-label), and the map for each class must land on its own mark.
- ``"distractor"``: one decisive mark and one distractor of another colour.

The generator is deterministic in ``seed``; boxes are exact pixel boxes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

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
    """``(M, 3, 32, 32)`` CIFAR-10 pictures in ``[0, 1]`` from the JPEG archive (see `captum_vit.data`):
    `cifar_pictures`, as floats."""
    return cifar_pictures(npz, split, limit)[0].float() / 255.0




# -- the natural-object task -----------------------------------------------------------------
#: side of the pasted CIFAR-10 picture (native resolution) on the 64x64 canvas
OBJECT = 32
OBJECT_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def texture(generator: torch.Generator, size: int = CANVAS) -> Tensor:
    """A ``(3, size, size)`` texture in ``[0, 1]``: smooth colour noise plus an oriented grating.

    Random low-frequency noise (a 4x4 to 8x8 colour grid upsampled bicubically)
    and a sinusoidal grating of random angle, period (4 to 16 px) and colour
    amplitude: object-free, so only the pasted picture can carry the label.
    """
    cells = int(torch.randint(4, 9, (1,), generator=generator))
    noise = torch.rand(1, 3, cells, cells, generator=generator)
    base = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0]
    angle, period, phase = (torch.rand(3, generator=generator) * torch.tensor([3.1416, 12.0, 6.2832])).tolist()
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    wave = torch.sin((xs * torch.cos(torch.tensor(angle)) + ys * torch.sin(torch.tensor(angle))) * 6.2832
                     / (4.0 + period) + phase)
    amplitude = (torch.rand(3, 1, 1, generator=generator) - 0.5) * 0.5
    return (base + amplitude * wave).clamp(0, 1)


def make_object_canvases(pictures: Tensor, labels: Tensor, backgrounds: Tensor, n: int, seed: int = 0,
                         texture_share: float = 0.5) -> EvidenceBatch:
    """``n`` object canvases: one of ``pictures`` pasted at a random place; the label is its class.

    Args:
        pictures: ``(M, 3, 32, 32)`` CIFAR-10 pictures in ``[0, 1]`` (or uint8
            0..255) to paste.
        labels: ``(M,)`` their classes (`OBJECT_CLASSES` order).
        backgrounds: ``(P, 3, h, w)`` pictures in ``[0, 1]`` (or uint8) used as
            backgrounds, upsampled to 64x64, on ``1 - texture_share`` of the
            canvases; the rest get a `texture`.
        n: number of canvases.
        seed: the generator's seed (pictures, places, backgrounds, textures).
        texture_share: share of canvases with a texture background.

    Returns:
        `EvidenceBatch` with ``labels`` ``(n, 10)`` one-hot and ``boxes[i] =
        [(class, (x0, y0, x0 + 32, y0 + 32))]``; no distractors.
    """
    if pictures.dim() != 4 or tuple(pictures.shape[1:]) != (3, OBJECT, OBJECT):
        raise ValueError(f"pictures must be (M, 3, {OBJECT}, {OBJECT}); got {tuple(pictures.shape)}.")
    if labels.shape != pictures.shape[:1]:
        raise ValueError(f"labels must be ({pictures.shape[0]},), one per picture; got {tuple(labels.shape)}.")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, pictures.shape[0], (n,), generator=g)
    behind = torch.randint(0, backgrounds.shape[0], (n,), generator=g)
    uses_texture = torch.rand(n, generator=g) < texture_share
    corners = torch.randint(0, CANVAS - OBJECT + 1, (n, 2), generator=g)
    canvases = F.interpolate(_unit(backgrounds[behind]), size=(CANVAS, CANVAS), mode="bilinear",
                             align_corners=False).clamp(0, 1)
    pasted = _unit(pictures[picks])
    boxes: List[List[Tuple[int, Box]]] = []
    for i in range(n):
        if uses_texture[i]:
            canvases[i] = texture(g)
        x0, y0 = (int(v) for v in corners[i])
        canvases[i, :, y0:y0 + OBJECT, x0:x0 + OBJECT] = pasted[i]
        boxes.append([(int(labels[picks[i]]), (x0, y0, x0 + OBJECT, y0 + OBJECT))])
    onehot = F.one_hot(labels[picks].long(), len(OBJECT_CLASSES)).float()
    return EvidenceBatch((canvases - MEAN) / STD, onehot, boxes, [[] for _ in range(n)])


def _unit(pictures: Tensor) -> Tensor:
    return pictures.float() / 255.0 if pictures.dtype == torch.uint8 else pictures.float()


def cifar_pictures(npz: Optional[str] = None, split: str = "train", limit: Optional[int] = None
                   ) -> Tuple[Tensor, Tensor]:
    """``(M, 3, 32, 32)`` uint8 CIFAR-10 pictures and ``(M,)`` labels, every class alike when ``limit`` is set."""
    import numpy as np

    from .data import CIFAR10JPEG

    dataset = CIFAR10JPEG(npz, split) if npz is not None else CIFAR10JPEG(split=split)
    step = max(1, len(dataset) // limit) if limit else 1  # the archive is sorted by class: take every step-th
    rows = list(range(0, len(dataset), step))[:limit]
    pictures = np.stack([np.asarray(dataset.image(i), dtype=np.uint8) for i in rows])
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous(), dataset.labels[rows].clone()


def held_out_data(npz: Optional[str], task: str) -> Dict[str, Tensor]:
    """The pictures a model of ``task`` is held out on: CIFAR-10 *test* pictures (1000 as backgrounds;
    every test picture to paste for ``"objects"``)."""
    if task == "marks":
        return {"backgrounds": evidence_backgrounds(npz, "test", 1000)}
    pictures, labels = cifar_pictures(npz, "test")
    return {"pictures": pictures, "labels": labels, "backgrounds": cifar_pictures(npz, "test", 1000)[0]}


@torch.no_grad()
def held_out_scores(model, task: str, data: Dict[str, Tensor], n: int = 512, seed: int = 10**6) -> Dict[str, float]:
    """A model card's figures: held-out accuracy and *certainty*, the median top-class softmax probability.

    Marks: accuracy per variant on ``n`` canvases each (right when the set of
    positive logits is exactly the decisive colours), certainty on *single*;
    objects: top-1 accuracy and certainty on ``2 n`` canvases. ``data``:
    `held_out_data`.
    """
    if task == "marks":
        result, certainty = {}, None
        for variant in VARIANTS:
            batch = make_canvases(data["backgrounds"], variant, n, seed)
            logits = model(batch.images)
            result[variant] = ((logits > 0) == batch.labels.bool()).all(1).float().mean().item()
            if certainty is None:
                certainty = logits.softmax(1).max(1).values.median().item()
        return {**result, "certainty": certainty}
    batch = make_object_canvases(data["pictures"], data["labels"], data["backgrounds"], 2 * n, seed)
    logits = torch.cat([model(batch.images[i:i + 256]) for i in range(0, 2 * n, 256)])
    return {"top1": (logits.argmax(1) == batch.labels.argmax(1)).float().mean().item(),
            "certainty": logits.softmax(1).max(1).values.median().item()}


# -- the zoo -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvidenceModelSpec:
    """One known-evidence ViT: its task, its timm architecture and its training recipe.

    ``task``: ``"marks"`` (six mark colours, multi-label) or ``"objects"``
    (ten CIFAR-10 classes). ``prefix``: ``"class"``, ``"class+distillation"``
    (timm's ``VisionTransformerDistilled``), ``"class+registers"`` or
    ``"none"`` (global average pooling over the patch tokens). ``steps`` of
    128 canvases at peak learning rate ``lr`` (one-cycle); ``label_smoothing``
    > 0 trains a less certain model; ``texture_share``: objects canvases
    with a texture behind the picture (the rest have another picture).
    """

    task: str
    depth: int
    width: int = 96
    heads: int = 3
    prefix: str = "class"
    steps: int = 1500
    label_smoothing: float = 0.0
    lr: float = 2e-3
    texture_share: float = 0.5

    @property
    def classes(self) -> Tuple[str, ...]:
        return CLASSES if self.task == "marks" else OBJECT_CLASSES

    def describe(self) -> Dict[str, object]:
        return asdict(self)


#: the known-evidence zoo trained by ``benchmarks/train_evidence.py`` (model cards:
#: ``captum_vit/assets/evidence/MODEL_CARD.md``). Shared: 64x64 canvases, patch 8 (8x8 grid), MLP ratio 2.
EVIDENCE_MODELS: Dict[str, EvidenceModelSpec] = {
    "cls4": EvidenceModelSpec("marks", depth=4),
    "cls8": EvidenceModelSpec("marks", depth=8),
    "dist4": EvidenceModelSpec("marks", depth=4, prefix="class+distillation"),
    "reg4": EvidenceModelSpec("marks", depth=4, prefix="class+registers"),
    "cls12-soft": EvidenceModelSpec("marks", depth=12, steps=600, label_smoothing=0.1),
    "gap6-soft": EvidenceModelSpec("marks", depth=6, width=128, heads=4, prefix="none", steps=700,
                                   label_smoothing=0.1),
    # objects: lr 1e-3 (at 2e-3 the width-192 model had not left chance after 800 steps)
    "obj4-w192": EvidenceModelSpec("objects", depth=4, width=192, heads=3, steps=1500, lr=1e-3),
    "obj6-reg": EvidenceModelSpec("objects", depth=6, width=128, heads=4, prefix="class+registers", steps=1500,
                                  lr=1e-3),
}


def build_evidence_model(name: str):
    """An untrained known-evidence ViT (see `EVIDENCE_MODELS`)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if name not in EVIDENCE_MODELS:
        raise ValueError(f"unknown known-evidence model {name!r}; choose one of {', '.join(EVIDENCE_MODELS)}.")
    spec = EVIDENCE_MODELS[name]
    family = VisionTransformerDistilled if spec.prefix == "class+distillation" else VisionTransformer
    layout = {"class": {}, "class+distillation": {}, "class+registers": dict(reg_tokens=4),
              "none": dict(class_token=False, global_pool="avg")}[spec.prefix]
    return family(img_size=CANVAS, patch_size=8, embed_dim=spec.width, depth=spec.depth, num_heads=spec.heads,
                  mlp_ratio=2.0, num_classes=len(spec.classes), **layout)


def evidence_model_path(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parent / "assets" / "evidence" / f"{name}.safetensors"


def load_evidence_model(name: str):
    """A trained known-evidence ViT from ``captum_vit/assets/evidence`` (fp16 weights -> float32, eval mode)."""
    from safetensors.torch import load_file

    if name not in EVIDENCE_MODELS:
        raise ValueError(f"unknown known-evidence model {name!r}; choose one of {', '.join(EVIDENCE_MODELS)}.")
    path = evidence_model_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; train it with benchmarks/train_evidence.py --models {name}.")
    model = build_evidence_model(name)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()

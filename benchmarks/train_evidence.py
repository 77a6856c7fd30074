"""Train the known-evidence zoo (:mod:`captum_vit.evidence`) on a CPU in minutes.

*Marks* models see a fresh mix of canvases every step (half *single*, a
quarter *pair*, a quarter *distractor*) with a multi-label loss (one logit
per mark colour), so they must find the decisive marks and ignore the hollow
distractors and the CIFAR background. Held-out accuracy: a canvas counts as
right when the set of logits above 0 is exactly its set of decisive colours.

*Objects* models see fresh object canvases (a CIFAR-10 train picture pasted
on a texture or on another train picture) with cross-entropy; held-out
accuracy is top-1 on canvases of test pictures on test backgrounds.

A model's ``label_smoothing`` (its `EvidenceModelSpec`) smooths the targets
(BCE targets ``y (1 - s) + s / 2``; cross-entropy's own smoothing), which
with fewer steps gives the less certain members of the zoo. The held-out
*certainty* is the median softmax probability of the top class.

    python benchmarks/train_evidence.py --data ../shared/data/cifar10_jpeg.npz --models cls4
    python benchmarks/train_evidence.py --data cifar10_jpeg.npz               # every model in the zoo

Weights go to ``captum_vit/assets/evidence/<name>.safetensors`` (fp16, with
the recipe, seed, accuracy and certainty as metadata), and the model card
``MODEL_CARD.md`` beside them is rewritten from every file's metadata
(``--card`` rewrites it alone; ``--card --check`` exits 1 if it is stale). Without the archive, build it from
the official CIFAR-10 python batches with ``captum_vit.data.write_cifar10_npz``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.evidence import EVIDENCE_MODELS as MODELS  # noqa: E402
from captum_vit.evidence import build_evidence_model as build  # noqa: E402
from captum_vit.evidence import cifar_pictures, evidence_backgrounds, make_canvases  # noqa: E402
from captum_vit.evidence import held_out_data, held_out_scores, load_evidence_model  # noqa: E402
from captum_vit.evidence import make_object_canvases  # noqa: E402

OUT = ROOT / "captum_vit" / "assets" / "evidence"


def marks_batch(data: dict, n: int, seed: int, texture_share: float):  # noqa: ARG001 - no textures here
    parts = [make_canvases(data["backgrounds"], "single", n // 2, seed),
             make_canvases(data["backgrounds"], "pair", n // 4, seed + 1),
             make_canvases(data["backgrounds"], "distractor", n - n // 2 - n // 4, seed + 2)]
    return torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])


def objects_batch(data: dict, n: int, seed: int, texture_share: float):
    batch = make_object_canvases(data["pictures"], data["labels"], data["backgrounds"], n, seed, texture_share)
    return batch.images, batch.labels


def loss_of(task: str, logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    if task == "marks":
        return F.binary_cross_entropy_with_logits(logits, labels * (1 - smoothing) + smoothing / 2)
    return F.cross_entropy(logits, labels.argmax(1), label_smoothing=smoothing)


def train(name: str, data: dict, held_out: dict, batch: int, seed: int) -> dict:
    spec = MODELS[name]
    torch.manual_seed(seed)
    model = build(name)
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    make_batch = marks_batch if spec.task == "marks" else objects_batch
    start = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        images, labels = make_batch(data[spec.task], batch, seed * 100_000 + step * 3, spec.texture_share)
        loss = loss_of(spec.task, model(images), labels, spec.label_smoothing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == spec.steps - 1:
            print(f"{name} step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # as shipped: fp16
    model.eval()
    return {"model": model, "seconds": seconds, **held_out_scores(model, spec.task, held_out[spec.task])}


def rescore(names: list, path: str) -> None:
    """Recompute the held-out figures of shipped files from their fp16 weights; rewrite the metadata only."""
    from safetensors import safe_open

    for name in names:
        spec, file = MODELS[name], str(OUT / f"{name}.safetensors")
        with safe_open(file, "pt") as f:
            metadata = dict(f.metadata())
        tensors = load_file(file)
        scores = held_out_scores(load_evidence_model(name), spec.task, held_out_data(path, spec.task))
        metadata.update({("" if k == "certainty" else "acc_") + k: f"{v:.8f}" for k, v in scores.items()})
        save_file(tensors, file, metadata=metadata)
        print(f"{name}: {scores}", flush=True)


def load_data(path: str, tasks: set) -> tuple:
    """Training and held-out pictures per task: train split for training, test split held out."""
    data = {}
    if "marks" in tasks:
        data["marks"] = {"backgrounds": evidence_backgrounds(path, "train", 5000)}
    if "objects" in tasks:
        pictures, labels = cifar_pictures(path, "train")
        data["objects"] = {"pictures": pictures, "labels": labels,
                           "backgrounds": cifar_pictures(path, "train", 5000)[0]}
    return data, {task: held_out_data(path, task) for task in tasks}


CARD_HEAD = """# Known-evidence ViTs (the zoo)

Tiny timm ViTs trained on `captum_vit.evidence` canvases on a 2-core CPU, where the pixels that decide the
label are known by construction (docs/evidence.md):

- **marks** (six classes, multi-label BCE): 64x64 canvases, a CIFAR-10 picture as background and coloured
  10x10 marks whose colour alone decides the label; each step 128 fresh canvases (1/2 *single*, 1/4 *pair*,
  1/4 *distractor*); held out: 512 canvases per variant on 1000 CIFAR-10 *test* pictures, right when the
  set of positive logits is exactly the decisive colours;
- **objects** (ten CIFAR-10 classes, cross-entropy): a 32x32 CIFAR-10 *train* picture pasted at a random
  place on a 64x64 canvas, behind it a texture (half the canvases) or another train picture; held out:
  top-1 on 1024 canvases of *test* pictures on test backgrounds.

Shared: patch 8 (an 8x8 grid), MLP ratio 2, no layer scale; AdamW (weight decay 0.05), one-cycle schedule
(10 % warm-up), batch 128, seed 0. *Certainty*: the median softmax probability of the top class on the
held-out canvases (*single* for marks). Label smoothing and fewer steps make the less certain members.

Reproduce: `python benchmarks/train_evidence.py --data cifar10_jpeg.npz --models NAME` (the archive comes from
`../shared/data` here, or from the official CIFAR-10 python batches via `captum_vit.data.write_cifar10_npz`).
This card is written from the files' metadata by the same script (`--card`).

"""

CARD_TAIL = """
Training times are wall-clock seconds on this project's 2-core CPU machine; most runs shared the two cores
with other training or benchmarks (the objects models and `gap6-soft`/`cls12-soft` ran three at a time), so
read them as upper bounds. The distilled model has no teacher: both heads learn the labels (timm's default,
`distilled_training=False`), which is what matters here, the layout.

Weights are stored in fp16 (recipe, accuracies and certainty in each file's metadata) and loaded in float32
by `captum_vit.evidence.load_evidence_model(name)`; together they take {size:.1f} MiB of the wheel. Training is
seeded; bit-identical weights across machines or thread counts are not promised (CPU kernels differ), so
retrained models should be compared by their held-out figures, not their bytes.
"""


def card() -> str:
    """MODEL_CARD.md from every model file's metadata."""
    from safetensors import safe_open

    lines = ["| name | task | timm class | blocks | width | prefix tokens | steps, lr, label smoothing | held-out "
             "accuracy | certainty | training time |", "|---|---|---|---:|---:|---|---|---|---:|---:|"]
    size = 0
    for name, spec in MODELS.items():
        path = OUT / f"{name}.safetensors"
        size += path.stat().st_size
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        accuracy = (" / ".join(f"{float(meta[f'acc_{v}']):.3f}" for v in ("single", "pair", "distractor"))
                    + " (s / p / d)" if spec.task == "marks" else f"{float(meta['acc_top1']):.3f} (top-1)")
        family = "deit.VisionTransformerDistilled" if spec.prefix == "class+distillation" else "VisionTransformer"
        lines.append(f"| `{name}` | {spec.task} | `{family}` | {spec.depth} | {spec.width} | {spec.prefix} | "
                     f"{spec.steps}, {spec.lr:g}, {spec.label_smoothing:g} | {accuracy} | {float(meta['certainty']):.7f} "
                     f"| {meta['train_seconds']} s |")
    return CARD_HEAD + "\n".join(lines) + "\n" + CARD_TAIL.format(size=size / 2**20)


def write_card(check: bool) -> int:
    text, path = card(), OUT / "MODEL_CARD.md"
    if check:
        if path.read_text() != text:
            print(f"{path} is stale: run python benchmarks/train_evidence.py --card", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="cifar10_jpeg.npz (backgrounds: train split; held out: test)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card", action="store_true", help="only rewrite MODEL_CARD.md from the files' metadata")
    parser.add_argument("--check", action="store_true", help="with --card: exit 1 if MODEL_CARD.md is stale")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute --models' held-out figures from their shipped fp16 weights (metadata only)")
    args = parser.parse_args()
    if args.card:
        sys.exit(write_card(args.check))
    if not args.data:
        parser.error("--data is required (the CIFAR-10 JPEG archive)")
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    if args.rescore:
        rescore(names, args.data)
        write_card(check=False)
        return
    data, held_out = load_data(args.data, {MODELS[name].task for name in names})
    OUT.mkdir(parents=True, exist_ok=True)

    for name in names:
        spec = MODELS[name]
        result = train(name, data, held_out, args.batch, args.seed)
        model, seconds = result.pop("model"), result.pop("seconds")
        recipe = dict(arch=spec.describe(), batch=args.batch, seed=args.seed,
                      optimiser="AdamW wd 0.05, one-cycle", threads=args.threads,
                      loss="BCE, multi-label" if spec.task == "marks" else "cross-entropy",
                      mix="1/2 single, 1/4 pair, 1/4 distractor" if spec.task == "marks" else
                      "CIFAR-10 train picture pasted at random; 1/2 texture, 1/2 CIFAR-10 train picture behind",
                      held_out="CIFAR-10 test pictures (and 1000 test backgrounds)")
        metadata = {"recipe": json.dumps(recipe), **{("" if k == "certainty" else "acc_") + k: f"{v:.8f}" for k, v in result.items()},
                    "train_seconds": f"{seconds:.0f}"}
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(OUT / f"{name}.safetensors"),
                  metadata=metadata)
        figures = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        print(f"{name}: held out {figures} in {seconds:.0f} s -> {OUT / name}.safetensors", flush=True)
    if all((OUT / f"{name}.safetensors").exists() for name in MODELS):
        write_card(check=False)


if __name__ == "__main__":
    main()

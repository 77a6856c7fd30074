"""Train tiny ViTs on known-evidence canvases (:mod:`captum_vit.evidence`) on a CPU in minutes.

Each model sees a fresh mix of canvases every step (half *single*, a quarter
*pair*, a quarter *distractor*) with a multi-label loss (one logit per mark
colour), so it must find the decisive marks and ignore the hollow
distractors and the CIFAR background. Held-out accuracy: a canvas counts as
right when the set of logits above 0 is exactly its set of decisive colours.

    python benchmarks/train_evidence.py --data ../shared/data/cifar10_jpeg.npz --models cls4
    python benchmarks/train_evidence.py --data cifar10_jpeg.npz               # every model in MODELS

Weights go to ``captum_vit/assets/evidence/<name>.safetensors`` (fp16, with
the recipe, seed and accuracy as metadata). Without the archive, build it from
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.evidence import EVIDENCE_MODELS as MODELS  # noqa: E402
from captum_vit.evidence import build_evidence_model as build  # noqa: E402
from captum_vit.evidence import evidence_backgrounds, make_canvases  # noqa: E402

OUT = ROOT / "captum_vit" / "assets" / "evidence"


def mixed_batch(backgrounds: torch.Tensor, n: int, seed: int):
    parts = [make_canvases(backgrounds, "single", n // 2, seed),
             make_canvases(backgrounds, "pair", n // 4, seed + 1),
             make_canvases(backgrounds, "distractor", n - n // 2 - n // 4, seed + 2)]
    return torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])


@torch.no_grad()
def accuracy(model: torch.nn.Module, backgrounds: torch.Tensor, variant: str, n: int = 512, seed: int = 10**6) -> float:
    batch = make_canvases(backgrounds, variant, n, seed)
    predicted = model(batch.images) > 0
    return (predicted == batch.labels.bool()).all(1).float().mean().item()


def train(name: str, backgrounds: torch.Tensor, held_out: torch.Tensor, steps: int, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build(name)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        images, labels = mixed_batch(backgrounds, batch, seed * 100_000 + step * 3)
        loss = F.binary_cross_entropy_with_logits(model(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    result = {variant: accuracy(model, held_out, variant) for variant in ("single", "pair", "distractor")}
    result["seconds"] = time.perf_counter() - start
    return {"model": model, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="cifar10_jpeg.npz (backgrounds: train split; held out: test)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backgrounds = evidence_backgrounds(args.data, "train", 5000)
    held_out = evidence_backgrounds(args.data, "test", 1000)  # other pictures behind the held-out marks
    OUT.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    for name in args.models.split(","):
        result = train(name, backgrounds, held_out, args.steps, args.batch, args.seed)
        model = result.pop("model")
        recipe = dict(arch=MODELS[name], steps=args.steps, batch=args.batch, seed=args.seed, lr=2e-3,
                      optimiser="AdamW wd 0.05, one-cycle", loss="BCE, multi-label", mix="1/2 single, 1/4 pair, "
                      "1/4 distractor", backgrounds="CIFAR-10 train (5000); held out: CIFAR-10 test (1000)")
        metadata = {"recipe": json.dumps(recipe), **{f"acc_{k}": f"{v:.4f}" for k, v in result.items()
                                                      if k != "seconds"}, "train_seconds": f"{result['seconds']:.0f}"}
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(OUT / f"{name}.safetensors"),
                  metadata=metadata)
        print(f"{name}: held-out accuracy single {result['single']:.4f}, pair {result['pair']:.4f}, distractor "
              f"{result['distractor']:.4f} in {result['seconds']:.0f} s -> {OUT / name}.safetensors", flush=True)


if __name__ == "__main__":
    main()

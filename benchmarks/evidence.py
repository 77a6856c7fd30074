"""Known-evidence benchmark: does each method's map land on the mark that decides the label?

Runs :func:`captum_vit.metrics.evaluate_known_evidence` for every method of
the registry and the random control on a trained known-evidence model
(``captum_vit/assets/evidence``), on held-out canvases (CIFAR-10 *test*
pictures behind the marks), and prints two Markdown tables with 95 %
bootstrap intervals (1000 resamples over images) and n:

- *single*: evidence mass (share of positive map mass inside the 10x10 mark,
  2.4 % of the canvas), pointing (maximum within 4 px of the mark), box IoU
  and Dice (AGCAM protocol: min-max scale, threshold 0.5, boxes of the
  regions), deletion/insertion AUC (16 steps, pixels to grey), ADCC;
- *pair*: class-specific pointing; *distractor*: pointing at the decisive
  mark rather than the hollow distractor, and the mass on the distractor;
- cascading model randomisation (head, then the last block down to the
  patch embedding): Spearman correlation of each map with the randomised
  model's map, after the head and last block, and after everything.

    python benchmarks/evidence.py --data ../shared/data/cifar10_jpeg.npz --model cls4
    torchrun --nproc-per-node 2 benchmarks/evidence.py --data cifar10_jpeg.npz --model cls8
    python benchmarks/evidence.py --plot          # bars with intervals from every results/evidence_*.json
    python benchmarks/evidence.py --data cifar10_jpeg.npz --model cls4 --sweep-reciprocam

Without ``../shared``, build the archive from the official CIFAR-10 python
batches with ``captum_vit.data.write_cifar10_npz``. Under ``torchrun`` each
process takes every W-th batch of canvases and rank 0 prints the merged
result, which equals the single-process one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Dict

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.evidence import EVIDENCE_MODELS, evidence_backgrounds, load_evidence_model, make_canvases  # noqa: E402
from captum_vit.methods import METHODS, TITLES  # noqa: E402
from captum_vit.metrics import (  # noqa: E402
    KNOWN_EVIDENCE_METRICS,
    bootstrap_interval,
    evaluate_known_evidence,
    evidence_mass,
    join_torchrun,
    top_pixel_inside,
)

RESULTS = ROOT / "benchmarks" / "results"
SINGLE = ("evidence_mass", "pointing", "iou", "dice", "deletion", "insertion", "adcc")
OTHERS = ("pair_pointing", "distractor_pointing", "distractor_mass", "constant")
NAMES = {"evidence_mass": "evidence mass", "pointing": "pointing", "iou": "IoU", "dice": "Dice",
         "deletion": "deletion", "insertion": "insertion", "adcc": "ADCC",
         "pair_pointing": "class-specific pointing (pair)", "distractor_pointing": "pointing past distractor",
         "distractor_mass": "mass on distractor", "constant": "constant maps"}
# the arrow says which way is better, from the library's own table of the metrics
HEADERS = {k: name + ("↑" if KNOWN_EVIDENCE_METRICS[k][1] else "↓") for k, name in NAMES.items()}


def fmt(s: Dict[str, float]) -> str:
    return f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def tables(report: dict) -> str:
    lines = [f"{report['model']}: n = {report['n']} canvases per variant; held-out accuracy single "
             f"{report['accuracy']['single']:.3f}, pair {report['accuracy']['pair']:.3f}, distractor "
             f"{report['accuracy']['distractor']:.3f}; {report['seconds']:.0f} s on {report['processes']} process(es); "
             "mean [95 % bootstrap interval]", ""]
    lines += ["| method | " + " | ".join(HEADERS[k] for k in SINGLE) + " |", "|---|" + "---:|" * len(SINGLE)]
    for method, s in report["summary"].items():
        lines.append(f"| {TITLES[method]} | " + " | ".join(fmt(s[k]) for k in SINGLE) + " |")
    stages = report["stages"]
    early, full = (f"spearman/{stages[1]}", f"spearman/{stages[-1]}") if stages else (None, None)
    lines += ["", "| method | " + " | ".join(HEADERS[k] for k in OTHERS) +
              (f" | Spearman↓, head + {stages[1]} randomised | Spearman↓, all randomised |" if stages else " |"),
              "|---|" + "---:|" * (len(OTHERS) + (2 if stages else 0))]
    for method, s in report["summary"].items():
        cells = [fmt(s[k]) for k in OTHERS] + ([fmt(s[early]), fmt(s[full])] if stages else [])
        lines.append(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    for method, why in report["unsupported"].items():
        lines.append(f"\n{TITLES[method]} did not run: {why}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    device = join_torchrun("cpu")
    import torch.distributed as dist

    rank = dist.get_rank() if device is not None else 0
    torch.set_num_threads(args.threads)
    model = load_evidence_model(args.model)
    backgrounds = evidence_backgrounds(args.data, "test", 1000)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # ADCC warns for each batch with a constant map (coherency 0 there); the table carries the effect
        warnings.filterwarnings("ignore", message=r".*constant map.*")
        result = evaluate_known_evidence(model, args.methods.split(","), backgrounds, n=args.n,
                                         batch_size=args.batch, randomization=not args.no_randomization,
                                         checkpoint_dir=args.checkpoint_dir)
    seconds = time.perf_counter() - start
    if device is not None:
        dist.destroy_process_group()
    if rank != 0:
        return
    report = {"model": args.model, "n": args.n, "accuracy": result.accuracy, "seconds": seconds,
              "processes": args.world,
              "stages": result.stages, "unsupported": result.unsupported, "summary": result.summary(),
              "command": " ".join(sys.argv)}
    print(tables(report))
    out = Path(args.json) if args.json else RESULTS / f"evidence_{args.model}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")


def cross_model_table(reports: list, metric: str) -> str:
    """One metric of every method on every model, as Markdown."""
    lines = ["| method | " + " | ".join(f"{r['model']} (n={r['n']})" for r in reports) + " |",
             "|---|" + "---:|" * len(reports)]
    methods = [m for m in METHODS if any(m in r["summary"] for r in reports)]
    for m in methods:
        cells = [fmt(r["summary"][m][metric]) if m in r["summary"] else "did not run" for r in reports]
        lines.append(f"| {TITLES[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(EVIDENCE_MODELS)
    reports = [json.loads(p.read_text()) for p in RESULTS.glob("evidence_*.json")]
    reports = sorted((r for r in reports if "summary" in r), key=lambda r: order.index(r["model"]))
    if not reports:
        raise SystemExit(f"no results in {RESULTS}: run the benchmark first.")
    metrics = ("pointing", "evidence_mass", "pair_pointing", "distractor_pointing")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(12, 3.1 * len(metrics)), sharex=True)
    methods = [m for m in METHODS if any(m in r["summary"] for r in reports)]
    width = 0.8 / len(reports)
    for ax, metric in zip(axes, metrics):
        for j, r in enumerate(reports):
            xs, means, errs = [], [], [[], []]
            for i, m in enumerate(methods):
                if m in r["summary"]:
                    s = r["summary"][m][metric]
                    xs.append(i - 0.4 + width * (j + 0.5))
                    means.append(s["mean"])
                    errs[0].append(s["mean"] - s["lo"])
                    errs[1].append(s["hi"] - s["mean"])
                else:  # an empty slot would read as 0: say the method did not run on this model
                    ax.text(i - 0.4 + width * (j + 0.5), 0.03, "did not run", rotation=90, ha="center",
                            va="bottom", fontsize=7)
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"{r['model']} (n={r['n']})")
        ax.set_ylabel(HEADERS[metric].replace(" (", "\n("), fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(reports), fontsize=8, loc="upper left")
    axes[-1].set_xticks(range(len(methods)))
    axes[-1].set_xticklabels([TITLES[m] for m in methods], rotation=25, ha="right", fontsize=9)
    fig.suptitle("Known evidence: means with 95 % bootstrap intervals (held-out canvases)")
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 3.6), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], reports):
        for m in methods:
            if m in r["summary"]:
                ax.plot(range(len(r["stages"])), [r["summary"][m][f"spearman/{s}"]["mean"] for s in r["stages"]],
                        marker="o", ms=3, label=TITLES[m], color=f"C{methods.index(m)}")  # one colour per method
        ax.set_xticks(range(len(r["stages"])))
        ax.set_xticklabels(r["stages"], rotation=60, ha="right", fontsize=7)
        ax.set_title(r["model"], fontsize=10)
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Spearman ρ, trained vs randomised map")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle("Cascading model randomisation (randomised from the head down; lower = depends on the weights)")
    fig.tight_layout()
    cascade = out.with_name(out.stem + "_randomization.png")
    fig.savefig(cascade, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"written {out} and {cascade}\n")
    for metric in ("pointing", "evidence_mass", "pair_pointing", "distractor_pointing", "constant"):
        print(f"{HEADERS[metric]}, mean [95 % bootstrap interval]\n\n{cross_model_table(reports, metric)}\n")


def sweep(args: argparse.Namespace) -> None:
    """ViT-ReciproCAM on *single* for every block, kernel, prefix-token and residual setting."""
    from captum_vit import LayerReciproCAM
    from captum_vit.metrics._known_evidence import _Canvases

    torch.set_num_threads(args.threads)
    model = load_evidence_model(args.model)
    single = _Canvases(make_canvases(evidence_backgrounds(args.data, "test", 1000), "single", args.n, 2024), 64)
    print(f"{args.model}: n = {args.n} single canvases, mean [95 % bootstrap interval]\n")
    print("| block | kernel | prefix tokens | residual | scores | evidence mass↑ | pointing↑ |")
    print("|---:|---|---|---|---|---:|---:|")
    rows = []
    for block in range(len(model.blocks)):
        cam = LayerReciproCAM(model, model.blocks[block])
        for kernel in ("gaussian", "dirac"):
            for keep in (True, False):
                for residual, scores in (("normalized", "softmax"), ("input", "logits")):
                    maps = cam.attribute(single.images, target=single.target, kernel=kernel,
                                         keep_prefix_tokens=keep, residual=residual, scores=scores)
                    row = {"block": block, "kernel": kernel, "prefix_tokens": "kept" if keep else "masked",
                           "residual": residual, "scores": scores,
                           "evidence_mass": bootstrap_interval(evidence_mass(maps, single.mark)),
                           "pointing": bootstrap_interval(top_pixel_inside(maps, single.near))}
                    rows.append(row)
                    print(f"| {block} | {kernel} | {row['prefix_tokens']} | {residual} | {scores} | "
                          f"{fmt(row['evidence_mass'])} | {fmt(row['pointing'])} |", flush=True)
    best = max(rows, key=lambda r: (r["pointing"]["mean"], r["evidence_mass"]["mean"]))
    print(f"\nbest: block {best['block']}, {best['kernel']}, prefix tokens {best['prefix_tokens']}, residual "
          f"{best['residual']}, scores {best['scores']}: pointing {fmt(best['pointing'])}, evidence mass "
          f"{fmt(best['evidence_mass'])}")
    out = RESULTS / f"evidence_sweep_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "n": args.n, "rows": rows, "command": " ".join(sys.argv)},
                              indent=2))
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="cifar10_jpeg.npz (its test split gives the held-out backgrounds)")
    parser.add_argument("--model", default="cls4", choices=list(EVIDENCE_MODELS))
    # not --n: torchrun would take it for an abbreviation of its own --nnodes/--nproc-per-node
    parser.add_argument("--canvases", dest="n", type=int, default=200, help="canvases per variant")
    parser.add_argument("--batch", type=int, default=50, help="canvases per batch (the unit shared across ranks)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-randomization", action="store_true")
    parser.add_argument("--checkpoint-dir", default=None, help="keep finished batches here; a rerun resumes")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep-reciprocam", action="store_true")
    parser.add_argument("--plot", action="store_true", help="draw benchmarks/results/evidence.png from the results")
    args = parser.parse_args()
    if args.plot:
        plot(RESULTS / "evidence.png")
        return
    if not args.data:
        parser.error("--data is required (the CIFAR-10 JPEG archive)")
    if args.sweep_reciprocam:
        sweep(args)
        return
    import os

    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    run(args)


if __name__ == "__main__":
    main()

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


#: ViT-ReciproCAM as each of its authors' codes runs it: (name, residual, scores, block)
OFFICIAL = (
    ("authors' repository (sybyun/vitcam)", "unmasked", "softmax", -2),
    ("OpenVINO Training Extensions 1.x", "normalized", "softmax", -1),
    ("OpenVINO XAI 1.1", "input", "logits", -1),
)
SWEEP_METRICS = ("pointing", "evidence_mass", "pair_pointing", "constant")


def _sweep_scores(cam, single, pair, **options) -> Dict[str, torch.Tensor]:
    """Per-canvas pointing, evidence mass, constant maps on *single* and class-specific pointing on *pair*."""
    maps = cam.attribute(single.images, target=single.target, **options)
    first = cam.attribute(pair.images, target=pair.target, **options)
    second = cam.attribute(pair.images, target=pair.second_target, **options)
    flat = maps.flatten(1)
    own_first = top_pixel_inside(first, pair.near) * (1 - top_pixel_inside(first, pair.second_near))
    own_second = top_pixel_inside(second, pair.second_near) * (1 - top_pixel_inside(second, pair.near))
    return {"pointing": top_pixel_inside(maps, single.near), "evidence_mass": evidence_mass(maps, single.mark),
            "pair_pointing": (own_first + own_second) / 2,
            "constant": (flat.max(1).values - flat.min(1).values <= 0).float()}


def sweep(args: argparse.Namespace) -> None:
    """Every official ViT-ReciproCAM variant x block x kernel; chosen on one half of the canvases, scored on the other.

    The residual/score pairs are those of the authors' three codes (:data:`OFFICIAL`), each at every block;
    prefix tokens kept (all three codes keep them by default). Per setting the per-canvas scores of both
    halves are written; the selection half ranks by pointing (then evidence mass), the held-out half reports.
    """
    from captum_vit import LayerReciproCAM
    from captum_vit.evidence import CANVAS
    from captum_vit.metrics import KnownEvidenceCanvases

    torch.set_num_threads(args.threads)
    model = load_evidence_model(args.model)
    backgrounds = evidence_backgrounds(args.data, "test", 1000)
    single, pair = (KnownEvidenceCanvases(make_canvases(backgrounds, v, args.n, 2024 + k), CANVAS)
                    for k, v in enumerate(("single", "pair")))
    halves = {"selection": slice(0, args.n // 2), "held_out": slice(args.n // 2, args.n)}
    depth = len(model.blocks)
    rows = []
    start = time.perf_counter()
    for block in range(depth):
        cam = LayerReciproCAM(model, model.blocks[block])
        for _, residual, scores, _ in OFFICIAL:
            for kernel in ("gaussian", "dirac"):
                values = _sweep_scores(cam, single, pair, kernel=kernel, residual=residual, scores=scores)
                row = {"block": block, "block_from_end": block - depth, "kernel": kernel, "residual": residual,
                       "scores": scores, "path": cam.last_path}
                for half, rows_ in halves.items():
                    row[half] = {k: bootstrap_interval(v[rows_]) for k, v in values.items()}
                rows.append(row)
                print(f"block {block} {kernel:>8} {residual:>10}/{scores:<7}: held out pointing "
                      f"{fmt(row['held_out']['pointing'])}", flush=True)
    report = {"model": args.model, "n": args.n, "halves": {k: [v.start, v.stop] for k, v in halves.items()},
              "seconds": time.perf_counter() - start, "rows": rows, "command": " ".join(sys.argv)}
    out = RESULTS / f"evidence_sweep_{args.model}.json"
    out.write_text(json.dumps(report, indent=2))
    print(sweep_tables([report]))
    print(f"written to {out}")


def _key(row: dict, half: str) -> tuple:
    return row[half]["pointing"]["mean"], row[half]["evidence_mass"]["mean"]


def _describe(row: dict) -> str:
    return f"block {row['block_from_end']}, {row['kernel']}, residual {row['residual']}, {row['scores']}"


def sweep_tables(reports: list) -> str:
    """Held-out scores of the official settings, of each model's best setting and of the best fixed setting."""
    cell = lambda row: " | ".join(fmt(row["held_out"][k]) for k in SWEEP_METRICS)  # noqa: E731
    head = "| " + " | ".join(HEADERS[k] for k in SWEEP_METRICS) + " |"
    lines = ["Held-out half of the canvases (settings chosen on the other half); mean [95 % bootstrap interval]", ""]
    for report in reports:
        rows = report["rows"]
        depth = max(r["block"] for r in rows) + 1
        lines += [f"{report['model']} ({depth} blocks, n = {report['n'] // 2} held out)", "",
                  "| setting | " + head[2:], "|---|" + "---:|" * len(SWEEP_METRICS)]
        for name, residual, scores, block in OFFICIAL:
            official = next(r for r in rows if (r["residual"], r["scores"], r["kernel"]) == (residual, scores, "gaussian")
                            and r["block_from_end"] == block)
            lines.append(f"| {name}: {_describe(official)} | {cell(official)} |")
        best = max(rows, key=lambda r: _key(r, "selection"))
        lines += [f"| best on the selection half: {_describe(best)} | {cell(best)} |", ""]
    if len(reports) > 1:  # one setting for every model: the best mean over models on the selection half
        settings = {(r["block_from_end"], r["kernel"], r["residual"], r["scores"]) for r in reports[0]["rows"]}
        def rows_of(setting):
            found = [next((r for r in rep["rows"] if (r["block_from_end"], r["kernel"], r["residual"], r["scores"])
                           == setting), None) for rep in reports]
            return found if all(found) else None
        candidates = [(s, rows_of(s)) for s in settings if rows_of(s)]
        setting, chosen = max(candidates, key=lambda c: tuple(sum(v) / len(v) for v in zip(*(_key(r, "selection")
                                                                                               for r in c[1]))))
        lines += [f"One setting for every model, chosen on the selection halves: {_describe(chosen[0])}", "",
                  "| model | " + head[2:], "|---|" + "---:|" * len(SWEEP_METRICS)]
        lines += [f"| {rep['model']} | {cell(r)} |" for rep, r in zip(reports, chosen)]
    return "\n".join(lines)


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
    parser.add_argument("--sweep-reciprocam", action="store_true",
                        help="every official ViT-ReciproCAM variant x block x kernel, held out (one model)")
    parser.add_argument("--sweep-summary", action="store_true",
                        help="tables of every results/evidence_sweep_*.json, and the best fixed setting")
    parser.add_argument("--plot", action="store_true", help="draw benchmarks/results/evidence.png from the results")
    args = parser.parse_args()
    if args.plot:
        plot(RESULTS / "evidence.png")
        return
    if args.sweep_summary:
        order = list(EVIDENCE_MODELS)
        reports = sorted((json.loads(p.read_text()) for p in RESULTS.glob("evidence_sweep_*.json")),
                         key=lambda r: order.index(r["model"]))
        print(sweep_tables([r for r in reports if "halves" in r]))
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

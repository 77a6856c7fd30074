"""What an evaluation writes: ``summary.json``, ``per_image.jsonl``, ``table.md``, ``plot.png``, and a reading.

Every figure is a mean over images with a 95 % bootstrap interval; ADCC also
gets the ViT-ReciproCAM paper's aggregate (the ADCC of the dataset means).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .methods import TITLES
from .metrics import AGGREGATES, EvaluationResult, field_spec


@dataclass
class WrittenEvaluation:
    files: List[Path]
    #: one line of meaning per figure, as printed by the CLI
    explained: str


def summary_of(result: EvaluationResult) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """`EvaluationResult.summary`, plus each metric's aggregates (`captum_vit.metrics.AggregateSpec`, e.g.
    ``adcc_of_means``) where their inputs were measured."""
    summary = result.summary()
    for method, values in result.values.items():
        for aggregate in AGGREGATES.values():
            if all(name in values for name in aggregate.inputs):
                means = [values[name].double().mean() for name in aggregate.inputs]
                summary[method][aggregate.name] = {"mean": float(aggregate.compute(*means)), "n": len(result.indices),
                                                   "higher_is_better": aggregate.higher_is_better}
    return summary


def _meaning(name: str) -> str:
    if name in AGGREGATES:
        return AGGREGATES[name].description
    return field_spec(name).describe(name)


def _shown(name: str) -> bool:
    return name in AGGREGATES or field_spec(name).shown


def _cell(stats: Dict[str, Any]) -> str:
    if "lo" not in stats:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} [{stats['lo']:.3f}, {stats['hi']:.3f}]"


def markdown_table(summary: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    """Methods as rows, figures as columns (arrows: which way is better), mean [95 % interval]."""
    names: List[str] = []
    for values in summary.values():
        names += [k for k in values if k not in names and _shown(k)]
    arrow = {True: "↑", False: "↓"}
    head = "| method | " + " | ".join(f"{n}{arrow[next(v[n] for v in summary.values() if n in v)['higher_is_better']]}"
                                     for n in names) + " |"
    rows = [f"| {TITLES.get(m, m)} | " + " | ".join(_cell(v[n]) if n in v else "" for n in names) + " |"
            for m, v in summary.items()]
    return "\n".join([head, "|---|" + "---:|" * len(names), *rows])


def explained(summary: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    """Each method's figures, one line each with what it means and which way is better."""
    lines = []
    for method, values in summary.items():
        lines.append(f"{TITLES.get(method, method)}:")
        for name, stats in values.items():
            if not _shown(name):
                continue
            better = "higher is better" if stats["higher_is_better"] else "lower is better"
            lines.append(f"  {name:>20}: {_cell(stats):>24}  {_meaning(name)}; {better}")
    return "\n".join(lines)


def plot(summary: Dict[str, Dict[str, Dict[str, Any]]], path: Path, title: str) -> Path:
    """One panel per figure, a bar per method with its 95 % interval."""
    from .visualization import pyplot

    plt = pyplot()
    # figures with an interval: the aggregates are one number each, said in the table
    names = [n for n in next(iter(summary.values())) if _shown(n) and n not in AGGREGATES]
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), squeeze=False)
    methods = list(summary)
    for ax, name in zip(axes.flat, names):
        stats = [summary[m].get(name) for m in methods]
        means = [s["mean"] if s else 0.0 for s in stats]
        errors = [[s["mean"] - s["lo"] if s else 0 for s in stats], [s["hi"] - s["mean"] if s else 0 for s in stats]]
        ax.bar(range(len(methods)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(methods))])
        better = "↑" if stats[0] is None or stats[0]["higher_is_better"] else "↓"
        ax.set_title(f"{name} {better}", fontsize=9)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([TITLES.get(m, m) for m in methods], rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{title}\nmeans with 95 % bootstrap intervals over images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _with_names(record: Dict[str, Any], paths: Optional[Sequence[Any]],
                class_names: Optional[Sequence[str]]) -> Dict[str, Any]:
    """A per-image record with its file and its classes' names, where known."""
    named: Dict[str, Any] = {"index": record["index"]}
    if paths is not None:
        named["path"] = str(paths[record["index"]])
    for key in ("label", "target", "predicted"):
        if key in record:
            named[key] = record[key]
            if class_names is not None and 0 <= record[key] < len(class_names):
                named[f"{key}_name"] = class_names[record[key]]
    return {**named, **{k: v for k, v in record.items() if k not in named}}


def write_evaluation(result: EvaluationResult, out: Path, title: str, seconds: float = float("nan"), *,
                     paths: Optional[Sequence[Any]] = None,
                     class_names: Optional[Sequence[str]] = None) -> WrittenEvaluation:
    """Write the evaluation's files into ``out``.

    Args:
        seconds: how long the evaluation took, for summary.json.
        paths: each dataset index's file, written into per_image.jsonl as ``path``.
        class_names: the model's classes: ``target``, ``predicted`` and ``label`` are written with their names
            (``target_name``, ...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_of(result)
    if not summary:
        raise ValueError("no method could run on this model: " + "; ".join(f"{m}: {why}" for m, why in
                                                                           result.unsupported.items()))
    files = [out / "summary.json", out / "per_image.jsonl", out / "table.md", out / "plot.png"]
    files[0].write_text(json.dumps({"title": title, "n": len(result.indices), "seconds": seconds, "summary": summary,
                                    "unsupported": result.unsupported}, indent=2))
    with files[1].open("w") as f:
        for record in result.records():
            f.write(json.dumps(_with_names(record, paths, class_names)) + "\n")
    table = markdown_table(summary)
    notes = "".join(f"\n\n{TITLES.get(m, m)} did not run: {why}" for m, why in result.unsupported.items())
    files[2].write_text(f"{title}; mean [95 % bootstrap interval]\n\n{table}{notes}\n")
    plot(summary, files[3], title)
    for partial in out.glob("records.rank*.jsonl"):  # the per-batch records are in per_image.jsonl now
        partial.unlink()
    return WrittenEvaluation(files, explained(summary) + notes)

"""Evaluation at the scale of a validation set: images/s and peak memory for growing ImageFolder trees.

Writes the first N CIFAR-10 *test* images (balanced over classes) as an
ImageFolder tree (``<class>/<index>.png``) for each N, then runs
``captum-vit evaluate TREE --use-labels`` on each, in one process and under
``torchrun --nproc-per-node 2``, every process with one thread
(``OMP_NUM_THREADS=1``), and reports the evaluation's images/s (from the
run's own timing in ``summary.json``, so start-up is left out) and the peak
resident memory of the largest process.

    python benchmarks/evaluation_scale.py --data ../shared/data/cifar10_jpeg.npz
    python benchmarks/evaluation_scale.py --data cifar10_jpeg.npz --sizes 500,2000,8000 --method reciprocam-fast

Without ``../shared``, build the archive from the official CIFAR-10 python
batches with ``captum_vit.data.write_cifar10_npz``. Results:
``benchmarks/results/evaluation_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.data import CIFAR10JPEG  # noqa: E402

#: runs a command and prints the peak resident memory (KiB) of its largest process, descendants included
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def write_tree(archive: CIFAR10JPEG, count: int, root: Path) -> Path:
    indices = archive.balanced_indices(-(-count // len(archive.classes)))[:count]
    for i in indices:
        folder = root / archive.classes[int(archive.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        archive.image(i).save(folder / f"{i}.png")
    return root


def run(tree: Path, processes: int, args: argparse.Namespace, out: Path) -> dict:
    cli = ["-m", "captum_vit.cli", "evaluate", str(tree), "--use-labels", "--method", args.method, "--metric",
           args.metric, "--batch", str(args.batch), "--out", str(out), "--device", "cpu"]
    if processes == 1:
        command = [sys.executable, *cli]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), *cli]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    peak = subprocess.run([sys.executable, "-c", PEAK, *command], env=env, capture_output=True, text=True, check=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"images": summary["n"], "processes": processes, "seconds": summary["seconds"],
            "images_per_s": summary["n"] / summary["seconds"], "peak_rss_mib": int(peak.stdout.split()[-1]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="cifar10_jpeg.npz")
    parser.add_argument("--sizes", default="500,2000,8000")
    parser.add_argument("--method", default="reciprocam-fast")
    parser.add_argument("--metric", default="constant")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--work", default=None, help="where the trees go (default: a temporary folder)")
    args = parser.parse_args()
    archive = CIFAR10JPEG(args.data, "test")
    work = Path(args.work or tempfile.mkdtemp(prefix="captum_vit_scale_"))
    rows = []
    for count in (int(s) for s in args.sizes.split(",")):
        tree = write_tree(archive, count, work / f"tree_{count}")
        for processes in (1, 2):
            row = run(tree, processes, args, work / f"out_{count}_{processes}")
            rows.append(row)
            print(f"{count:>6} images, {processes} process(es): {row['images_per_s']:.1f} images/s, "
                  f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"\n{args.method} + {args.metric} on the embedded DeiT-Tiny (CIFAR-10 pictures upsampled to 224), one thread "
          "per process\n\n| images | processes | images/s | peak memory (MiB) |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['processes']} | {r['images_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    out = ROOT / "benchmarks" / "results" / "evaluation_scale.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "method": args.method, "metric": args.metric,
                               "rows": rows}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

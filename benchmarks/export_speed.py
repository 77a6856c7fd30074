"""Explanations at the cost of inference, in the runtimes models are deployed with.

For each model and batch size, a plain forward and the explained forward
(:class:`captum_vit.export.ExplainedViT`: logits + ViT-ReciproCAM maps of the
predicted class) are timed side by side in each runtime: PyTorch eager,
onnxruntime (CPU) and OpenVINO (when installed, from the same ONNX files).
Runs are interleaved (plain, explained, plain, ...) and the median of
``--repeats`` is reported; random weights (time does not depend on them).

    python benchmarks/export_speed.py                                   # DeiT-S and DeiT-B, batch 1 and 8
    python benchmarks/export_speed.py --models deit_small_patch16_224 --batches 1 --repeats 5

Needs the ``export`` extra (onnx, onnxscript, onnxruntime; openvino optional).
Results go to ``benchmarks/results/export_speed.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.export import ExplainedViT  # noqa: E402


class PlainForward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def median_interleaved(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds that run them in turn, after one warm-up each."""
    for fn in fns.values():
        fn()  # warm-up
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _onnx(module: torch.nn.Module, images: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(module, (images,), str(path), dynamo=True, input_names=["images"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "export_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
        print("onnxruntime not installed: PyTorch eager only (pip install -e '.[export]')", file=sys.stderr)
    try:
        import openvino as ov
    except ImportError:
        ov = None
    work = Path(tempfile.mkdtemp())
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=1000).eval()
        plain, explained = PlainForward(model).eval(), ExplainedViT(model).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            images = torch.randn(batch, 3, 224, 224)
            with torch.no_grad():
                eager = median_interleaved({"plain": lambda: plain(images), "explained": lambda: explained(images)},
                                            args.repeats)
            rows.append({"model": name, "batch": batch, "runtime": "PyTorch eager", **eager})
            if ort is None:
                continue
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            files = {k: _onnx(m, images, work / f"{name}_{k}_b{batch}.onnx")
                     for k, m in (("plain", plain), ("explained", explained))}
            sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                        for k, p in files.items()}
            feed = {"images": images.numpy()}
            onnx_times = median_interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                                             args.repeats)
            maps = sessions["explained"].run(None, feed)[1]
            with torch.no_grad():
                reference_maps = explained(images)[1].numpy()
            rows.append({"model": name, "batch": batch, "runtime": "onnxruntime", **onnx_times,
                         "max_map_difference": float(np.abs(maps - reference_maps).max())})
            if ov is not None:
                core = ov.Core()
                with torch.no_grad():
                    _, reference = explained(images)
                # OpenVINO's CPU plugin runs bf16 by default where the CPU has it: f32 must be asked for
                for label, precision in (("OpenVINO f32", "f32"), ("OpenVINO bf16 (its CPU default here)", "bf16")):
                    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": precision}
                    compiled = {k: core.compile_model(str(p), "CPU", config) for k, p in files.items()}
                    ov_times = median_interleaved({k: (lambda c=c: c(feed)) for k, c in compiled.items()},
                                                   args.repeats)
                    maps = np.asarray(compiled["explained"](feed)[1])
                    rows.append({"model": name, "batch": batch, "runtime": label, **ov_times,
                                 "max_map_difference": float(np.abs(maps - reference.numpy()).max())})
    print(f"\n{args.threads} CPU threads, float32, median of {args.repeats} interleaved runs\n")
    print("| model | batch | runtime | plain forward ms/image | explained ms/image | × its plain forward "
          "| max map difference vs eager |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        b = r["batch"]
        diff = f"{r['max_map_difference']:.1e}" if "max_map_difference" in r else "-"
        print(f"| {r['model']} | {b} | {r['runtime']} | {1000 * r['plain'] / b:.1f} | {1000 * r['explained'] / b:.1f} "
              f"| {r['explained'] / r['plain']:.2f} | {diff} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows,
                                           "torch": torch.__version__}, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()

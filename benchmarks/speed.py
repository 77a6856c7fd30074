"""Time every explainer against a plain forward pass of the same batch.

    python benchmarks/speed.py --model deit_small_patch16_224 --batch 8 --device cpu
    python benchmarks/speed.py --model deit_base_patch16_224 --batch 64 --device cuda --dtype bfloat16
    python benchmarks/speed.py --model swin_tiny_patch4_window7_224 --batch 4 --block 9 \
        --methods forward,reciprocam-authors,reciprocam-general,layergradcam

Each method is timed alternately with a plain forward pass of the same batch
(forward, method, forward, method, ...), and its multiple of the forward is
the ratio of the two medians. Methods: every method of the registry (``captum_vit.methods``, as the
CLI runs them: ViT-ReciproCAM and its variants on their fast paths, AGCAM, the
rollouts, Relevance, Captum IntegratedGradients with n_steps=50 and
internal_batch_size=batch, LayerGradCam on the last block's norm1 tokens
reshaped to the grid); LayerReciproCAM's general path; and, when
``pytorch-grad-cam`` is installed, its ScoreCAM and AblationCAM with a ViT
reshape transform. Weights are random (timing does not depend on them).
``reciprocam-general`` is the registry's ``reciprocam-authors`` (block -2, unmasked
residual; another with ``--block``) forced onto the general path; ``relevance-float32`` is Relevance in
the model's own precision (the registry's ``relevance`` computes in float64 on
a CPU).
Prints a Markdown table (images/s, ms/image, multiple of the forward) and
writes it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import timm
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's per-batch progress bars
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit import LayerReciproCAM, TransformerAttribution, UnsupportedModelError  # noqa: E402
from captum_vit.adapters import find_adapter  # noqa: E402
from captum_vit.methods import EXPLAINERS, explainer  # noqa: E402

#: every registry method except the random control, the general path as its own row, pytorch-grad-cam
ALL = ["forward", *EXPLAINERS, "reciprocam-general", "relevance-float32", "pgc-scorecam", "pgc-ablationcam"]


def build_methods(
    model: torch.nn.Module, batch: int, copies: int, block: int = -2
) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """The registry's methods (``captum_vit.methods``), as the CLI and the demo run them, plus
    ReciproCAM's general path forced on ``block`` (``copies`` masked copies per call) and pytorch-grad-cam.
    A method the model's family refuses (e.g. attention methods on Swin) is left out, with its reason."""

    def forward(x, t):
        with torch.no_grad():
            return model(x)

    def relevance_float32():  # the model's own precision: what float64 costs
        relevance = TransformerAttribution(model, precision="float32")
        return lambda x, t: relevance.attribute(x, target=t)

    def general():
        cam = LayerReciproCAM(model, find_adapter(model).blocks[block])
        return lambda x, t: cam.attribute(x, target=t, path="general", batch_size=copies)

    builders: Dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], Any]]] = {
        name: (lambda name=name: explainer(name, model, batch_size=batch if name == "ig" else None))
        for name in EXPLAINERS  # IG's internal batch is the batch; the others pick their own chunks
    }
    builders.update({"reciprocam-general": general, "relevance-float32": relevance_float32})
    methods: Dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {"forward": forward}
    for name, build in builders.items():
        try:
            methods[name] = build()
        except UnsupportedModelError as err:
            print(f"skipping {name}: {str(err).split(';')[0]}", file=sys.stderr)
    if find_adapter(model).num_prefix_tokens:  # pytorch-grad-cam's ViT reshape: prefix tokens and one grid
        methods.update(pytorch_grad_cam_methods(model, batch))
    return methods


def pytorch_grad_cam_methods(model: torch.nn.Module, batch: int) -> Dict[str, Callable]:
    try:
        from pytorch_grad_cam import AblationCAM, ScoreCAM
        from pytorch_grad_cam.ablation_layer import AblationLayerVit
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return {}
    adapter = find_adapter(model)
    P = adapter.num_prefix_tokens

    def reshape(tokens):
        h, w = adapter.grid_for(adapter.model.patch_embed.img_size)
        return tokens[:, P:].reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    layers = [model.blocks[-1].norm1]
    score = ScoreCAM(model=model, target_layers=layers, reshape_transform=reshape)
    score.batch_size = batch
    ablation = AblationCAM(model=model, target_layers=layers, reshape_transform=reshape,
                           ablation_layer=AblationLayerVit(), batch_size=batch)

    def run(cam):
        return lambda x, t: cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

    return {"pgc-scorecam": run(score), "pgc-ablationcam": run(ablation)}


def timed(fn: Callable[[], Any], forward: Callable[[], Any], device: torch.device, repeats: int,
          warmup: int) -> Tuple[List[float], List[float]]:
    """Seconds of ``fn`` and of the plain forward, run alternately: on a shared machine the load changes
    within minutes, and a ratio is only meaningful when both sides of it met the same load."""

    def once(f: Callable[[], Any]) -> float:
        start = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        fn()
        forward()
    method_s, forward_s = [], []
    for _ in range(repeats):
        forward_s.append(once(forward))
        method_s.append(once(fn))
    return method_s, forward_s


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 = autocast")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--copies", type=int, default=None, help="general path: masked copies per call")
    parser.add_argument("--block", type=int, default=-2, help="general path: the explained block (registry's: -2)")
    parser.add_argument("--methods", default=",".join(ALL), help=f"comma list from {','.join(ALL)}")
    parser.add_argument("--slow-repeats", type=int, default=1, help="timed runs for IG and pytorch-grad-cam (no warm-up)")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/speed_*.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000).eval().to(device)
    image_size = model.patch_embed.img_size
    images = torch.randn(args.batch, 3, *image_size, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    adapter = find_adapter(model)
    h, w = adapter.block_grid(args.block % len(adapter.blocks), image_size)
    copies = args.copies or max(256, 4 * (adapter.num_prefix_tokens + h * w))
    methods = build_methods(model, args.batch, copies, args.block)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16" else contextlib.nullcontext()
    )
    rows = []
    names = [n for n in args.methods.split(",") if n != "forward"]
    forward_all: List[float] = []
    for name in names:
        if name not in methods:
            print(f"skipping {name}: not available (pytorch-grad-cam not installed?)", file=sys.stderr)
            continue
        slow = name.startswith("pgc-") or name == "ig"  # minutes per run on a CPU: timed once
        with autocast:
            times, forward_times = timed(lambda: methods[name](images, targets), lambda: methods["forward"](images, targets),
                                         device, args.slow_repeats if slow else args.repeats, 0 if slow else args.warmup)
        forward_all += forward_times
        rows.append({"method": name, "seconds": statistics.median(times), "runs": len(times),
                     "forward_s": statistics.median(forward_times)})
        print(f"{name:>20}: {1000 * rows[-1]['seconds'] / args.batch:9.2f} ms/image", file=sys.stderr, flush=True)
    rows.insert(0, {"method": "forward", "seconds": statistics.median(forward_all), "runs": len(forward_all),
                    "forward_s": statistics.median(forward_all)})
    for r in rows:  # each method against the forwards timed beside it
        r.update(images_per_s=args.batch / r["seconds"], ms_per_image=1000 * r["seconds"] / args.batch,
                 x_forward=r["seconds"] / r["forward_s"])

    meta = {
        "model": args.model, "batch": args.batch, "device": str(device), "dtype": args.dtype,
        "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "reciprocam_general_copies_per_call": copies, "reciprocam_general_block": args.block,
        "reciprocam_general_grid": [h, w],
    }
    print(f"\n{args.model}, batch {args.batch}, {device} ({meta['gpu'] or meta['threads']} "
          f"{'' if meta['gpu'] else 'threads'}), {args.dtype}\n")
    print("| method | images/s | ms/image | x forward |")
    print("|---|---:|---:|---:|")
    for r in rows:
        x = f"{r['x_forward']:.2f}"
        print(f"| {r['method']} | {r['images_per_s']:.2f} | {r['ms_per_image']:.2f} | {x} |")
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / (
        f"speed_{device.type}_{args.model}_{args.dtype}_b{args.batch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")
    return result


if __name__ == "__main__":
    main()

"""Peak memory of each method against a plain forward, and the fast path's cost of ``batch_size``.

Each measurement runs in a fresh process (peak resident memory can only grow
within one): the model and inputs are built, the resident set is read, the
method runs once, and the growth of the peak resident set is reported.
Random weights: memory and time do not depend on them.

    python benchmarks/memory.py                         # DeiT-Small at 592 px: a 37x37 grid, batch 4
    python benchmarks/memory.py --img-size 224 --batch 8 --json benchmarks/results/memory_224.json

The time ratio of ReciproCAM's fast path with and without ``batch_size`` is
measured in one process, interleaved (``--repeats`` rounds, median).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "forward": "plain forward (no_grad)",
    "forward-grad": "forward + backward of one logit",
    "agcam": "AttentionGuidedGradCAM",
    "rollout": "AttentionRollout",
    "grad-rollout": "GradientRollout",
    "attnlrp": "AttnLRP (registry defaults: CP-LRP attention, pixel maps)",
    "legrad": "LeGrad (registry defaults: the last two blocks)",
    "reciprocam": "LayerReciproCAM, block -2 (the authors' setting, registry reciprocam-authors; fast path)",
    "reciprocam-last": "LayerReciproCAM, last block (fast path)",
    "reciprocam-last-bs64": "LayerReciproCAM, last block (fast path, batch_size=64)",
}


def _setup(model_name: str, img_size: int, batch: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=img_size, num_classes=1000).eval()
    images = torch.randn(batch, 3, img_size, img_size)
    return model, images


def _run_case(case: str, model, images) -> None:
    import torch

    from captum_vit import AttentionGuidedGradCAM, AttentionRollout, AttnLRP, GradientRollout, LayerReciproCAM, LeGrad

    if case == "forward":
        with torch.no_grad():
            model(images)
    elif case == "forward-grad":
        model(images)[:, 0].sum().backward()
        model.zero_grad(set_to_none=True)
    elif case == "agcam":
        AttentionGuidedGradCAM(model).attribute(images, target=0)
    elif case == "rollout":
        AttentionRollout(model).attribute(images)
    elif case == "grad-rollout":
        GradientRollout(model).attribute(images, target=0)
    elif case == "attnlrp":
        AttnLRP(model).attribute(images, target=0)
    elif case == "legrad":
        LeGrad(model).attribute(images, target=0)
    elif case.startswith("reciprocam"):
        batch_size = 64 if case.endswith("bs64") else None
        block, residual = (-1, "normalized") if "last" in case else (-2, "unmasked")  # the registry's two settings
        LayerReciproCAM(model, model.blocks[block]).attribute(images, target=0, path="fast", batch_size=batch_size,
                                                              residual=residual)
    else:
        raise ValueError(case)


def _child(args: argparse.Namespace) -> None:
    """One measurement: print the growth of the peak resident set (MiB) during the case."""
    model, images = _setup(args.model, args.img_size, args.batch)
    import torch

    torch.set_num_threads(args.threads)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _run_case(args.case, model, images)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"case": args.case, "peak_growth_mib": (after - before) / 1024}))


def _timing(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, images = _setup(args.model, args.img_size, args.batch)
    from captum_vit import LayerReciproCAM

    cam = LayerReciproCAM(model, model.blocks[-1])
    cam.attribute(images[:1], target=0, path="fast")  # proves the fast path once
    times = {"without": [], "with": []}
    for _ in range(args.repeats):
        for key, size in (("without", None), ("with", 64)):
            start = time.perf_counter()
            cam.attribute(images, target=0, path="fast", batch_size=size)
            times[key].append(time.perf_counter() - start)
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    return {"fast_s": without, "fast_bs64_s": with_, "ratio": with_ / without}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=592, help="592 px with patch 16: a 37x37 grid")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one child measurement
    args = parser.parse_args()
    if args.case is not None:
        _child(args)
        return
    grid = args.img_size // 16
    print(f"{args.model}, {args.img_size} px ({grid}x{grid} grid for patch 16), batch {args.batch}, "
          f"{args.threads} threads; peak resident-set growth per case, each in a fresh process")
    results = {}
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--model", args.model, "--img-size", str(args.img_size),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[case] = json.loads(out)["peak_growth_mib"]
    forward = results.get("forward")
    print("| case | peak growth (MiB) | x plain forward |\n|---|---:|---:|")
    for case, mib in results.items():
        ratio = f"{mib / forward:.1f}" if forward else "-"
        print(f"| {CASES[case]} | {mib:.0f} | {ratio} |")
    timing = _timing(args)
    print(f"ReciproCAM fast path: {timing['fast_s']:.2f} s without batch_size, {timing['fast_bs64_s']:.2f} s with "
          f"batch_size=64: {timing['ratio']:.2f}x (median of {args.repeats}, interleaved)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "peak_growth_mib": results, "timing": timing},
                                              indent=2))


if __name__ == "__main__":
    main()

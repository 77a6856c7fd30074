"""ExplainedViT as two OpenVINO graphs: the trunk (every block before the last) in bf16, the explained last
block and its copies in f32, against the plain forward in bf16 and f32 and the whole explained graph in f32.

The copies' scores differ by less than bf16 resolves, so the explained part stays in f32; the trunk, which
no copy reaches, may run in the runtime's fast precision. Maps are compared with the whole graph in f32
(raw scores min-max scaled per map, as `ExplainedViT` returns them). Random weights (time does not depend
on them); needs the ``export`` extra with OpenVINO.

    python benchmarks/export_mixed_precision.py --model deit_small_patch16_224 --batch 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from export_speed import PlainForward, median_interleaved  # this folder's export benchmark

from captum_vit.export import ExplainedViT


def scaled(maps: np.ndarray) -> torch.Tensor:
    """Each ``(h, w)`` map min-max scaled to [0, 1], as ``ExplainedViT(normalize=True)`` returns it."""
    maps = torch.from_numpy(np.asarray(maps))
    low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + 1e-12)


class Part(torch.nn.Module):
    """One method of `ExplainedViT` as a module of its own, so it exports alone."""

    def __init__(self, owner: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, x: torch.Tensor):
        return getattr(self.owner, self.method)(x)


def compile_onnx(core, module: torch.nn.Module, example: torch.Tensor, path: Path, precision: str, threads: int):
    torch.onnx.export(module, (example,), str(path), dynamo=True)
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
    return core.compile_model(str(path), "CPU", config)


def main() -> None:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000).eval()
    explained = ExplainedViT(model, normalize=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        block_input = explained.trunk(images)
    work, core = Path(tempfile.mkdtemp()), ov.Core()
    plain = PlainForward(model)
    graphs = {
        "plain f32": compile_onnx(core, plain, images, work / "plain.onnx", "f32", args.threads),
        "plain bf16": compile_onnx(core, plain, images, work / "plain.onnx", "bf16", args.threads),
        "explained f32": compile_onnx(core, explained, images, work / "explained.onnx", "f32", args.threads),
        "trunk bf16": compile_onnx(core, Part(explained, "trunk"), images, work / "trunk.onnx", "bf16", args.threads),
        "explained part f32": compile_onnx(core, Part(explained, "from_block_input"), block_input,
                                           work / "tail.onnx", "f32", args.threads),
    }
    feed = images.numpy()

    def mixed():
        x = np.asarray(graphs["trunk bf16"](feed)[0])
        return graphs["explained part f32"](x)

    runs = {name: (lambda g=g: g(feed)) for name, g in graphs.items() if name != "explained part f32"}
    runs["mixed: trunk bf16 + explained part f32"] = mixed
    times = median_interleaved(runs, args.repeats)
    fastest = times["plain bf16"]
    reference, mixed_maps = scaled(graphs["explained f32"](feed)[1]), scaled(mixed()[1])
    print(f"\n{args.model}, batch {args.batch}, {args.threads} threads, OpenVINO {ov.__version__}, "
          f"median of {args.repeats}\n")
    print("| graph | ms/image | x plain bf16 forward |")
    print("|---|---:|---:|")
    for name, median in times.items():
        print(f"| {name} | {1000 * median / args.batch:.1f} | {median / fastest:.2f} |")
    print(f"\nmixed maps vs the whole graph in f32 (scaled per map): max difference "
          f"{float((mixed_maps - reference).abs().max()):.3g}")


if __name__ == "__main__":
    main()

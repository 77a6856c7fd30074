"""``captum-vit``: explain images, evaluate explainers, run the demo.

    captum-vit demo --out demo_out
    captum-vit explain cat.png --model deit_small_patch16_224 --method agcam --top-k 3
    captum-vit explain img.png --model default --method reciprocam --target cat
    captum-vit evaluate --model default --data ../shared/data/cifar10_jpeg.npz --method reciprocam --limit 200

Bad input (a missing file, not an image, an unknown model, weights that
cannot be fetched, a target out of range) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .methods import METHODS, TITLES

CLI_METHODS = ("reciprocam", "reciprocam-dirac", "agcam", "rollout", "grad-rollout", "ig")


_OFFLINE_HINT = " (no network access? use a local checkpoint: --model PATH --arch NAME, or --model default)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line."""


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available; use --device cpu.")
    return torch.device(name)


def _load(spec: str, arch: Optional[str], device: torch.device):
    from .models import CheckpointNotFoundError, ModelSpecError, load_model

    try:
        loaded = load_model(spec, arch=arch)
    except (CheckpointNotFoundError, ModelSpecError) as err:
        raise UsageError(str(err)) from None
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UsageError(f"unknown model {spec!r}: not a timm model name nor a checkpoint file.") from None
        raise UsageError(f"could not load {spec!r}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - hub clients raise many types when offline
        raise UsageError(f"could not load {spec!r}: {_first_line(err)}{_OFFLINE_HINT}") from None
    loaded.forward.to(device)
    return loaded


def _resolve_target(target: Optional[str], class_names: Optional[Sequence[str]], num_classes: int) -> Optional[int]:
    if target is None:
        return None
    if target.lstrip("-").isdigit():
        index = int(target)
    elif class_names is not None and target in class_names:
        index = list(class_names).index(target)
    else:
        raise UsageError(f"unknown target {target!r}: give a class index in [0, {num_classes - 1}] or a class name.")
    if not 0 <= index < num_classes:
        raise UsageError(f"target {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1}).")
    return index


def _name(class_names: Optional[Sequence[str]], index: int) -> str:
    return f"{class_names[index]} ({index})" if class_names else str(index)


def cmd_explain(args: argparse.Namespace) -> int:
    from PIL import UnidentifiedImageError

    from .data import denormalize
    from .methods import explainer
    from .visualization import explanation_figure

    device = _device(args.device)
    for path in args.images:
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such file.")
    loaded = _load(args.model, args.arch, device)
    methods = args.method or ["reciprocam"]
    fns = {m: explainer(m, loaded.forward, vit=loaded.vit) for m in methods}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        try:
            x = loaded.preprocess(path).to(device)
        except (UnidentifiedImageError, ValueError, OSError):
            raise UsageError(f"{path}: not an image that PIL can read.") from None
        with torch.no_grad():
            probs = loaded.forward(x).float().softmax(-1)[0]
        target = _resolve_target(args.target, loaded.class_names, probs.shape[0])
        classes = [target] if target is not None else probs.topk(min(args.top_k, probs.shape[0])).indices.tolist()
        stem = Path(path).stem
        pixels = denormalize(x[0].cpu(), loaded.mean, loaded.std)
        for c in classes:
            maps, times = {}, {}
            for m, fn in fns.items():
                start = time.perf_counter()
                result = fn(x, torch.tensor([c], device=device)).detach().cpu()
                times[TITLES[m]] = 1000 * (time.perf_counter() - start)
                maps[TITLES[m]] = result[0]
                np.save(out / f"{stem}_{m}_class{c}.npy", result[0, 0].numpy())
            figure = out / f"{stem}_class{c}.png"
            title = f"{Path(path).name}\nclass {_name(loaded.class_names, c)}: p={probs[c]:.3f}"
            explanation_figure(pixels, maps, title, figure, times)
            print(f"{path}: class {_name(loaded.class_names, c)} p={probs[c]:.3f} -> {figure}")
    return 0


def _evaluation_loader(data: str, batch: int, limit: Optional[int], loaded):
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from .data import CIFAR10JPEG

    path = Path(data)
    if not path.exists():
        raise UsageError(f"{data}: no such file or folder.")
    if path.suffix == ".npz":
        dataset = CIFAR10JPEG(path, "test")
        indices = range(len(dataset))
        if limit is not None:  # the archive is sorted by class: spread the subset over classes
            indices = dataset.balanced_indices(max(1, -(-limit // len(dataset.classes))))[:limit]
        return DataLoader(Subset(dataset, list(indices)), batch_size=batch)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise UsageError(f"{data}: no images (.png, .jpg, .jpeg, .bmp, .webp) found.")
    images = torch.cat([loaded.preprocess(f) for f in files])
    return DataLoader(TensorDataset(images), batch_size=batch)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .methods import explainer
    from .metrics import evaluate_adcc

    device = _device(args.device)
    loaded = _load(args.model, args.arch, device)
    loader = _evaluation_loader(args.data, args.batch, args.limit, loaded)
    fn = explainer(args.method, loaded.forward, vit=loaded.vit)
    result = evaluate_adcc(loaded.forward, fn, loader, use_labels=args.use_labels,
                           checkpoint_dir=args.checkpoint_dir, device=device)
    summary = result.summary()
    print(f"{TITLES[args.method]} on {args.model}, {summary['n']} images:")
    for key in ("average_drop", "average_increase", "coherency", "complexity", "adcc_of_means", "mean_adcc"):
        print(f"  {key:>17}: {summary[key]:6.2f} %")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), _device(args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captum-vit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    model_help = "timm model name (pretrained=True), a local .safetensors/.pth checkpoint, or 'default'"
    explain = sub.add_parser("explain", help="explain images and write overlays (PNG) and raw maps (.npy)")
    explain.add_argument("images", nargs="+")
    explain.add_argument("--model", default="default", help=model_help)
    explain.add_argument("--arch", default=None, help="timm architecture of a .pth/.safetensors checkpoint")
    explain.add_argument("--method", action="append", choices=CLI_METHODS,
                         help="repeat for several (default: reciprocam)")
    explain.add_argument("--target", default=None, help="class index or name (default: the top-k predictions)")
    explain.add_argument("--top-k", type=int, default=1)
    explain.add_argument("--out", default="captum_vit_out")
    explain.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    explain.set_defaults(func=cmd_explain)

    evaluate = sub.add_parser("evaluate", help="ADCC of a method over a dataset, with a progress bar")
    evaluate.add_argument("--model", default="default", help=model_help)
    evaluate.add_argument("--arch", default=None)
    evaluate.add_argument("--data", required=True, help="a CIFAR-10 .npz archive or a folder of images")
    evaluate.add_argument("--method", default="reciprocam", choices=[m for m in METHODS if m != "random"])
    evaluate.add_argument("--metric", default="adcc", choices=["adcc"])
    evaluate.add_argument("--limit", type=int, default=None, help="first N images (balanced over classes for .npz)")
    evaluate.add_argument("--batch", type=int, default=32)
    evaluate.add_argument("--use-labels", action="store_true", help="explain labels instead of predictions")
    evaluate.add_argument("--checkpoint-dir", default=None, help="write finished batches here; resume from them")
    evaluate.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    evaluate.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="explain the bundled images with the embedded model")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        parser.error("--top-k must be at least 1")
    try:
        return args.func(args)
    except UsageError as err:
        print(f"captum-vit: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"captum-vit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captum-vit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

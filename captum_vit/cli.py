"""``captum-vit``: explain images, evaluate explainers, run the demo.

    captum-vit demo --out demo_out
    captum-vit explain photos/ --model deit_small_patch16_224 --method agcam --top-k 3
    captum-vit explain "shots/*.jpg" img.png --model default --method reciprocam --target cat
    captum-vit evaluate cifar10_jpeg.npz --model default --method reciprocam --limit 200
    captum-vit evaluate cifar10_jpeg.npz --metric grid_pointing --method grad-rollout --grids 100
    torchrun --nproc-per-node 2 -m captum_vit.cli evaluate cifar10_jpeg.npz --checkpoint-dir runs/rc

Bad input (a missing or unreadable file, not an image, an unknown model,
weights that cannot be fetched, a target out of range, an output path that
cannot be written) prints one line and exits with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .methods import EXPLAINERS, OPTIONS, REGISTRY, TITLES
from .metrics import ALIASES as METRIC_ALIASES
from .metrics import METRICS as METRIC_REGISTRY

#: evaluate's --metric choices: every registry metric and the names that select one
METRIC_CHOICES = (*METRIC_REGISTRY, *METRIC_ALIASES)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: explain and evaluate offer every registry explainer (the random control is for benchmarks)
CLI_METHODS = EXPLAINERS


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available; use --device cpu or auto.")
    return torch.device(name)


def _output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path} is a file; give a folder to write the outputs into.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {path}: {err.strerror or _first_line(err)}.") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"the output folder {path} is not writable; choose another with --out.")
    return out


def _describe_model(spec: str, loaded) -> str:
    """One line: which model and preprocessing, and what its classes are."""
    classes = loaded.class_names
    named = f"{len(classes)} classes ({', '.join(list(classes)[:3])}, ...)" if classes else "classes without names"
    size = loaded.data_config.get("input_size", ("?", "?", "?"))[1:]
    what = "the embedded DeiT-Tiny trained on CIFAR-10" if spec in ("default", "") else spec
    return f"{what}: {named}; preprocessing: timm's, to {size[0]}x{size[1]}"


def _load(spec: str, arch: Optional[str], device: torch.device):
    from .models import load_model

    try:
        loaded = load_model(spec, arch=arch)
    except (ValueError, OSError) as err:  # our own messages: unknown name, missing file, weights offline
        raise UsageError(_first_line(err)) from None
    except Exception as err:  # noqa: BLE001 - a checkpoint that does not fit the architecture, etc.
        raise UsageError(f"could not load {spec!r}: {_first_line(err)}") from None
    loaded.forward.to(device)
    return loaded


def expand_image_paths(specs: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """Files, folders (every image inside, recursively) and globs -> image paths, and specs that matched nothing."""
    found: List[Path] = []
    unmatched: List[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        else:
            matches = []
        if not matches:
            unmatched.append(spec)
        found.extend(m for m in matches if m not in found)
    return found, unmatched


def resolve_class(target: str, class_names: Optional[Sequence[str]], num_classes: int) -> int:
    """A class index from an index or a name: case-insensitive, any synonym of a ``"a, b, c"`` name."""
    text = target.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            raise UsageError(f"target {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1}).")
        return index
    if not class_names:
        raise UsageError(f"unknown target {target!r}: this model has no class names; give a class index in [0, {num_classes - 1}].")
    wanted = text.lower()
    synonyms: Dict[str, List[int]] = {}
    for i, name in enumerate(class_names):
        for synonym in {name.lower(), *(s.strip().lower() for s in name.split(","))}:
            synonyms.setdefault(synonym, []).append(i)
    matches = sorted(set(synonyms.get(wanted, [])))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        listed = "; ".join(f"{i}: {class_names[i]}" for i in matches)
        raise UsageError(f"target {target!r} names {len(matches)} classes ({listed}); give the index.")
    raise UsageError(f"unknown target {target!r}; {_class_hint(wanted, synonyms, class_names)}.")


#: a model with at most this many classes has them all listed when a target name is unknown
LISTED_CLASSES = 20


def _class_hint(wanted: str, synonyms: Dict[str, List[int]], class_names: Sequence[str]) -> str:
    """All classes of a small model; else the names that contain the word, then those spelt alike."""
    if len(class_names) <= LISTED_CLASSES:
        return "the classes are " + ", ".join(f"{name} ({i})" for i, name in enumerate(class_names))
    containing = [s for s in synonyms if re.search(rf"\b{re.escape(wanted)}\b", s)]
    close = difflib.get_close_matches(wanted, list(synonyms), n=20, cutoff=0.6)
    indices = list(dict.fromkeys(i for c in [*containing, *close] for i in synonyms[c]))[:8]  # distinct, best first
    if not indices:
        return f"give a class index in [0, {len(class_names) - 1}] or a class name"
    return "close matches: " + "; ".join(f"{class_names[i]} ({i})" for i in indices)


def _name(class_names: Optional[Sequence[str]], index: int) -> str:
    return f"{class_names[index]} ({index})" if class_names else str(index)


def _read_images(paths: Sequence[Path], preprocess: Callable) -> Tuple[List[Tuple[Path, torch.Tensor]], List[str]]:
    good, failed = [], []
    for path in paths:
        try:
            good.append((path, preprocess(path)))
        except (ValueError, OSError) as err:  # preprocess names the file
            failed.append(_first_line(err) if str(path) in str(err) else f"{path} ({_first_line(err)})")
    return good, failed


def method_options(args: argparse.Namespace, methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Each method's options from the flags the registry's options make (`captum_vit.methods.OPTIONS`).

    A flag goes to every chosen method that takes it; a flag no chosen method takes is refused, naming the
    methods that take it.
    """

    given = {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}
    options: Dict[str, Dict[str, Any]] = {m: {} for m in methods}
    for name, value in given.items():
        takers = [m for m in methods if any(o.name == name for o in REGISTRY[m].options)]
        if not takers:
            able = [m for m, spec in REGISTRY.items() if any(o.name == name for o in spec.options)]
            raise UsageError(f"{OPTIONS[name].flag} is an option of {', '.join(able)}; add one of them with --method.")
        for m in takers:
            options[m][name] = value
    return {m: o for m, o in options.items() if o}


def _text_reader(option: Any) -> Callable[[str], Any]:
    """argparse's ``type`` for a registry option: its parser, with its error said as argparse says one."""

    def read(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    read.__name__ = option.parse.__name__  # argparse names it in "invalid <type> value"
    return read


def _add_method_options(parser: argparse.ArgumentParser) -> None:

    for option in OPTIONS.values():
        takers = [m for m, spec in REGISTRY.items() if option in spec.options]
        scope = "reciprocam*" if all(m.startswith("reciprocam") for m in takers) else ", ".join(takers)
        parser.add_argument(option.flag, dest=option.name, type=_text_reader(option), choices=option.choices,
                            default=None, help=f"{option.help} [{scope}]")



def cmd_explain(args: argparse.Namespace) -> int:
    from .data import denormalize
    from .methods import explainer
    from .visualization import explanation_figure

    device = _device(args.device)
    paths, unmatched = expand_image_paths(args.images)
    if not paths:
        raise UsageError(f"{', '.join(unmatched)}: no such file, or no images in it.")
    out = _output_dir(args.out)
    methods = args.method or ["reciprocam"]
    options = method_options(args, methods)
    loaded = _load(args.model, args.arch, device)
    print(f"model: {_describe_model(args.model, loaded)}")
    fns = {m: explainer(m, loaded.forward, vit=loaded.vit, normalize=False, **options.get(m, {})) for m in methods}
    failed = [f"{spec} (no such file, or no images in it)" for spec in unmatched]
    stems: Dict[str, int] = {}
    for start in range(0, len(paths), args.batch_size):
        batch, bad = _read_images(paths[start : start + args.batch_size], loaded.preprocess)
        failed.extend(bad)
        if not batch:
            continue
        batch_stems = [_unique_stem(path, stems) for path, _ in batch]
        x = torch.cat([t for _, t in batch]).to(device)
        with torch.no_grad():
            probs = loaded.forward(x).float().softmax(-1)
        C = probs.shape[1]
        if args.top_k > C and start == 0:
            print(f"captum-vit: --top-k {args.top_k} is more than the model's {C} classes; explaining all {C}.",
                  file=sys.stderr)
        if args.target is not None:
            targets = [[resolve_class(args.target, loaded.class_names, C)]] * len(batch)
        else:
            targets = probs.topk(min(args.top_k, C), dim=1).indices.tolist()
        for rank in range(len(targets[0])):
            t = torch.tensor([row[rank] for row in targets], device=device)
            raw = {m: fn(x, t).detach().float().cpu() for m, fn in fns.items()}
            for i, (path, _) in enumerate(batch):
                c, stem = int(t[i]), batch_stems[i]
                for m in methods:
                    np.save(out / f"{stem}_{m}_class{c}.npy", raw[m][i, 0].numpy())
                figure = out / f"{stem}_class{c}.png"
                title = f"{path.name}\nclass {_name(loaded.class_names, c)}: p={probs[i, c]:.3f}"
                maps = {TITLES[m]: raw[m][i] for m in methods}
                agnostic = [TITLES[m] for m in methods if not REGISTRY[m].class_specific]
                explanation_figure(denormalize(x[i].cpu(), loaded.mean, loaded.std), maps, title, figure,
                                   class_agnostic=agnostic)
                print(f"{path}: class {_name(loaded.class_names, c)} p={probs[i, c]:.3f} -> {figure}")
    return _skipped_status(failed)


def _unique_stem(path: Path, taken: Dict[str, int]) -> str:
    """Output file stem of ``path``: its name, numbered when two inputs share it (a/cat.png, b/cat.png)."""
    n = taken.get(path.stem, 0)
    taken[path.stem] = n + 1
    return path.stem if n == 0 else f"{path.stem}_{n}"


def _evaluation_data(data: str, args: argparse.Namespace, loaded) -> Any:
    """The dataset behind ``DATA``: a CIFAR-10 ``.npz`` archive, an ImageFolder tree, a flat folder, a file list."""
    from torch.utils.data import Subset

    from .data import CIFAR10JPEG, ImageFolderDataset, read_boxes, timm_box_mapping

    path = Path(data)
    if not path.exists():
        raise UsageError(f"{data}: no such file or folder.")
    if path.is_file() and path.suffix == ".npz":
        dataset = CIFAR10JPEG(path, "test")  # names what is wrong with the file
        indices = range(len(dataset))
        if args.limit is not None:  # the archive is sorted by class: spread the subset over classes
            indices = dataset.balanced_indices(max(1, -(-args.limit // len(dataset.classes))))[: args.limit]
        return Subset(dataset, list(indices))
    if path.is_file() and path.suffix.lower() != ".txt":
        raise UsageError(f"{data}: give a CIFAR-10 .npz archive, a folder of images (class subfolders give labels) "
                         "or a .txt list of image paths.")
    boxes = read_boxes(args.boxes) if args.boxes else None
    dataset = ImageFolderDataset(path, loaded.transform, class_names=loaded.class_names, label_order=args.label_order,
                                 require_labels=args.use_labels, boxes=boxes,
                                 box_mapping=timm_box_mapping(loaded.data_config) if boxes else None, limit=args.limit)
    if args.use_labels and all(label < 0 for label in dataset.labels):
        raise UsageError(f"--use-labels needs labels: {data} has no class subfolders (folder/<class>/<image>); "
                         "without --use-labels each image's predicted class is explained.")
    return dataset


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate, join_torchrun

    device = _device(args.device)
    data = args.data_path or args.data
    if data is None:
        raise UsageError("give the data to evaluate on: captum-vit evaluate DATA (a folder, a .txt list or an .npz).")
    if not Path(data).exists():
        raise UsageError(f"{data}: no such file or folder.")
    if args.checkpoint_dir is not None and Path(args.checkpoint_dir).is_file():
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir} is a file; give a folder.")
    out = _output_dir(args.out)
    distributed = join_torchrun(device)  # under torchrun: one shard of the batches per process
    if distributed is not None:
        device = distributed
    loaded = _load(args.model, args.arch, device)
    print(f"model: {_describe_model(args.model, loaded)}")
    dataset = _evaluation_data(data, args, loaded)
    methods, metrics = args.method or ["reciprocam"], args.metric or ["adcc"]
    options = method_options(args, methods)
    if "grid_pointing" in metrics:
        return _grid_pointing(args, loaded, dataset, methods, metrics, options, out, distributed)
    start = time.perf_counter()
    try:
        result = evaluate(loaded.forward, methods, dataset, metrics, use_labels=args.use_labels, batch_size=args.batch,
                          num_workers=args.num_workers, checkpoint_dir=args.checkpoint_dir, restart=args.restart,
                          records_dir=out, device=device, method_options=options)
    finally:
        if distributed is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if distributed is not None and int(os.environ.get("RANK", "0")) != 0:
        return 0
    from .reports import write_evaluation

    model_name = "the embedded DeiT-Tiny (CIFAR-10)" if args.model in ("default", "") else args.model
    written = write_evaluation(result, out, title=f"{', '.join(TITLES[m] for m in methods)} on {model_name}, "
                                                  f"{len(result.indices)} images", seconds=time.perf_counter() - start,
                               paths=_dataset_paths(dataset), class_names=loaded.class_names)
    print(f"{len(result.indices)} images, {len(methods)} method(s): {', '.join(TITLES[m] for m in methods)}")
    print(written.explained)
    print(f"written: {', '.join(str(p) for p in written.files)}")
    return _skipped_status(getattr(dataset, "skipped", []))


def _dataset_paths(dataset: Any) -> Optional[List[Any]]:
    """Each index's file, for a dataset of files (a CIFAR-10 archive has none: its records keep the index)."""
    paths = getattr(dataset, "paths", None)
    return list(paths) if paths is not None else None


def _skipped_status(skipped: Sequence[str]) -> int:
    """The rule of both commands for unreadable inputs: the others are explained and written, the skipped ones
    are listed on stderr, and the exit status is 2 so that a script notices."""
    if not skipped:
        return 0
    print(f"captum-vit: error: {len(skipped)} input(s) skipped: {'; '.join(skipped)}", file=sys.stderr)
    return 2


def _grid_pointing(args: argparse.Namespace, loaded, dataset, methods: List[str], metrics: List[str],
                   options: Dict[str, Dict[str, Any]], out: Path, distributed) -> int:
    """The grid pointing game on grids built from the labelled pictures of ``dataset``."""
    import json

    from .metrics import build_pointing_grids, evaluate_grid_pointing

    if len(metrics) > 1:
        raise UsageError("grid_pointing scores grids built from the data, not the images themselves: "
                         "run --metric grid_pointing on its own.")
    if distributed is not None:
        raise UsageError("grid_pointing runs in one process; run it without torchrun.")
    items = [dataset[i] for i in range(len(dataset))]
    labelled = [(item[0], item[1]) for item in items if item[1] is not None and item[1] >= 0]
    if not labelled:
        raise UsageError("grid_pointing needs labelled pictures: a folder of class subfolders or a CIFAR-10 .npz.")
    images = torch.stack([image for image, _ in labelled])
    labels = torch.tensor([label for _, label in labelled])
    try:
        grids = build_pointing_grids(loaded.forward, images, labels, args.grids, grid=args.grid,
                                     confidence=args.confidence)
    except ValueError as err:
        raise UsageError(f"cannot build pointing grids from {len(labelled)} pictures: {err}") from None
    result = evaluate_grid_pointing(loaded.forward, methods, grids, progress=True, method_options=options)
    print(f"grid pointing game ({args.grid}x{args.grid}, chance {result.chance:.2f}) on {args.model}: "
          f"{result.recognised} of {result.grids} grids recognised")
    report = {"model": args.model, "grid": args.grid, "grids": result.grids, "recognised": result.recognised,
              "scored": result.scored, "reason": result.reason, "unsupported": result.unsupported,
              "summary": result.summary() if result.scored else {}}
    if not result.scored:
        print(f"not scored: {result.reason}")
    for method, fields_ in report["summary"].items():
        print(f"  {TITLES[method]}: " + ", ".join(f"{k.replace('grid_', '')} {v['mean']:.3f} [{v['lo']:.3f}, "
                                                  f"{v['hi']:.3f}]" for k, v in fields_.items()))
    for method, why in result.unsupported.items():
        print(f"  {TITLES[method]} did not run: {why}")
    path = out / "grid_pointing.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_METHODS, run_demo

    run_demo(_output_dir(args.out), _device(args.device), args.method or DEMO_METHODS)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of the command."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"captum-vit: error: {message} (see {self.prog} --help)\n")


MODEL_HELP = "timm model name (pretrained=True), a local .safetensors/.pth checkpoint, or 'default'"
DEVICES = ["auto", "cpu", "cuda"]
DEVICE_HELP = "auto (default): CUDA when there is a GPU, else the CPU"


def _methods_help() -> str:
    return "; ".join(f"{m}: {TITLES[m]}" for m in CLI_METHODS)


def _explain_parser(sub: Any) -> None:
    explain = sub.add_parser("explain", help="explain images and write overlays (PNG) and raw maps (.npy)")
    explain.add_argument("images", nargs="+", help="image files, folders (every image inside) or globs")
    explain.add_argument("--model", default="default", help=MODEL_HELP)
    explain.add_argument("--arch", default=None, help="timm architecture of a .pth/.safetensors checkpoint")
    explain.add_argument("--method", action="append", choices=CLI_METHODS, metavar="METHOD",
                         help=f"repeat for several (default: reciprocam). {_methods_help()}")
    explain.add_argument("--target", default=None,
                         help="class index or name, case-insensitive, any synonym (default: the top-k predictions)")
    explain.add_argument("--top-k", type=_positive_int, default=1,
                         help="explain each image's k most probable classes (default 1); ignored with --target")
    explain.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch (default 8)")
    explain.add_argument("--out", default="captum_vit_out",
                         help="folder for the overlays (PNG) and raw maps (.npy) (default captum_vit_out)")
    explain.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    _add_method_options(explain)
    explain.set_defaults(func=cmd_explain)


def _evaluate_parser(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="score methods with metrics over a dataset, with a progress bar")
    evaluate.add_argument("data_path", nargs="?", metavar="DATA",
                          help="a folder of images (class subfolders give labels, matched to the model's classes by "
                               "name), a .txt list of image paths, or a CIFAR-10 .npz archive")
    evaluate.add_argument("--data", default=None, help="the same as DATA (kept for older scripts)")
    evaluate.add_argument("--model", default="default", help=MODEL_HELP)
    evaluate.add_argument("--arch", default=None, help="timm architecture of a .pth/.safetensors checkpoint")
    evaluate.add_argument("--method", action="append", choices=CLI_METHODS, metavar="METHOD",
                          help=f"repeat for several (default: reciprocam). {_methods_help()}")
    evaluate.add_argument("--metric", action="append", choices=METRIC_CHOICES, metavar="METRIC",
                          help="repeat for several (default: adcc): " + "; ".join(METRIC_CHOICES))
    evaluate.add_argument("--limit", type=_positive_int, default=None,
                          help="the first N images (balanced over classes for .npz)")
    evaluate.add_argument("--batch", type=_positive_int, default=32, help="images per batch (default 32)")
    evaluate.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    evaluate.add_argument("--use-labels", action="store_true",
                          help="explain the labels (class subfolders) instead of the predicted classes")
    evaluate.add_argument("--label-order", default="names", choices=["names", "sorted"],
                          help="match class subfolders to the model's classes by name (default) or sorted index")
    evaluate.add_argument("--boxes", default=None,
                          help="ground-truth boxes, JSON {image: [[x0,y0,x1,y1],...]} or CSV image,x0,y0,x1,y1 rows")
    evaluate.add_argument("--out", default="captum_vit_evaluation",
                          help="folder for summary.json, per_image.jsonl, table.md and plot.png")
    evaluate.add_argument("--grids", type=_positive_int, default=100,
                          help="grid_pointing: grids to build (default 100)")
    evaluate.add_argument("--grid", type=int, default=2, choices=[2, 3], help="grid_pointing: cells per side (2 or 3)")
    evaluate.add_argument("--confidence", type=float, default=0.9,
                          help="grid_pointing: a picture enters a grid when classified right with this probability")
    evaluate.add_argument("--checkpoint-dir", default=None, help="write finished batches here; resume from them")
    evaluate.add_argument("--restart", action="store_true", help="delete --checkpoint-dir's results and start over")
    evaluate.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    _add_method_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def _demo_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="explain the bundled images with the embedded model")
    demo.add_argument("--out", default="demo_out", help="folder for the figures (default demo_out)")
    demo.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    demo.add_argument("--method", action="append", choices=CLI_METHODS, metavar="METHOD",
                      help="repeat for several (default: reciprocam, agcam, ig)")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="captum-vit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    _explain_parser(sub)
    _evaluate_parser(sub)
    _demo_parser(sub)
    return parser


#: the options whose values may be negative block indices, and such a value ("-2", "-1,-2")
NEGATIVE_OPTIONS = tuple(o.flag for o in OPTIONS.values() if o.negative)
_NEGATIVE_VALUE = re.compile(r"^-\d[\d,\s-]*$")


def attach_negative_values(argv: Sequence[str]) -> List[str]:
    """``--layers -1,-2`` as ``--layers=-1,-2`` (`NEGATIVE_OPTIONS`).

    argparse reads a token that starts with ``-`` and is not a plain negative
    number as an option name, so ``--layers -1,-2`` would fail with "expected
    one argument"; joined with ``=``, the value is the option's.
    """
    out: List[str] = []
    for token in argv:
        if out and out[-1] in NEGATIVE_OPTIONS and _NEGATIVE_VALUE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("captum-vit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure is one line unless --debug
        if args.debug:
            raise
        if isinstance(err, UsageError):
            message = str(err)
        elif isinstance(err, OSError) and err.filename is not None:
            message = f"{err.filename}: {err.strerror or _first_line(err)}"
        elif isinstance(err, (ValueError, TypeError, OSError)):
            message = _first_line(err)
        else:
            print(f"captum-vit: internal error: {type(err).__name__}: {_first_line(err)} "
                  "(please report it; --debug shows the traceback)", file=sys.stderr)
            return 1
        print(f"captum-vit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

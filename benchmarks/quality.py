"""Every method on the trained CIFAR-10 ViTs, side by side (the shape of ViT-ReciproCAM's Table 1).

    python benchmarks/quality.py                       # CPU default: both models, a balanced subset
    python benchmarks/quality.py --per-class 1000 --mosaics 500 --device cuda   # the full test split

For each model in ``--shared/models`` and each method: Average Drop, Average
Increase, Coherency, Complexity, ADCC (harmonic mean of the means, as the
paper's Table 1, and the mean of per-example ADCC), the grid pointing game on
2x2 mosaics of confidently classified test images of four distinct classes,
deletion and insertion AUC, milliseconds per image, and a sanity check
(Adebayo et al. 2018): the Spearman correlation between each method's maps
on the trained model and on the same architecture with random weights (lower
is better). Every map explains the model's predicted class.

Data: ``--shared/data/cifar10_jpeg.npz``. Without it, build the archive from
the official CIFAR-10 python batches with
``python -c "from captum_vit.data import write_cifar10_npz as w; w('cifar-10-batches-py', 'cifar10_jpeg.npz')"``
and pass ``--shared`` to a folder holding ``data/`` and ``models/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.data import CIFAR10JPEG  # noqa: E402
from captum_vit.methods import METHODS, TITLES, explainer  # noqa: E402
from captum_vit.metrics import adcc, deletion_insertion, make_mosaic, pointing_game, upsample_maps  # noqa: E402
from captum_vit.models import CIFAR_ARCHITECTURES, CIFARClassifier, load_cifar_checkpoint  # noqa: E402


def batched(fn, x: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch], t[i : i + batch]).detach() for i in range(0, x.shape[0], batch)])


def predict(forward, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([forward(x[i : i + batch]).float().softmax(-1) for i in range(0, x.shape[0], batch)])


def build_mosaics(images, labels, probs, count, seed, threshold=0.5):
    """Mosaics of four correctly classified (p >= threshold) images of distinct classes."""
    confident = (probs.argmax(1) == labels) & (probs.max(1).values >= threshold)
    by_class = {c: torch.nonzero(confident & (labels == c))[:, 0].tolist() for c in range(10)}
    usable = [c for c, idx in by_class.items() if idx]
    if len(usable) < 4:
        return None, None
    rng = np.random.default_rng(seed)
    mosaics, cells = [], []
    for _ in range(count):
        classes = rng.choice(usable, size=4, replace=False)
        picks = [by_class[c][rng.integers(len(by_class[c]))] for c in classes]
        mosaics.append(make_mosaic(images[picks]))
        cells.append(torch.tensor(classes))
    return torch.stack(mosaics), torch.stack(cells)


def spearman_per_image(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    size = a.shape[-2:] if a.shape[-1] >= b.shape[-1] else b.shape[-2:]
    a = upsample_maps(a, size, normalize=False).flatten(1).cpu().numpy()
    b = upsample_maps(b, size, normalize=False).flatten(1).cpu().numpy()
    values = []
    for x, y in zip(a, b):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            values.append(0.0)
        else:
            values.append(float(spearmanr(x, y).statistic))
    return float(np.mean(values))


def evaluate_model(path: Path, args, data: CIFAR10JPEG) -> Dict[str, Any]:
    device = torch.device(args.device)
    loaded = load_cifar_checkpoint(path)
    model = loaded.forward.to(device)
    torch.manual_seed(args.seed)
    random_vit = CIFAR_ARCHITECTURES[path.stem]().eval()
    random_model = CIFARClassifier(random_vit, loaded.forward.img_size).eval().to(device)

    per_class = args.per_class or (args.per_class_224 if loaded.forward.img_size > 64 else args.per_class_32)
    indices = data.balanced_indices(per_class)
    images = torch.stack([data[i][0] for i in indices]).to(device)
    labels = data.labels[indices].to(device)
    probs = predict(model, images, args.batch)
    predicted = probs.argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    pool = data.balanced_indices(max(per_class, 20))
    pool_images = torch.stack([data[i][0] for i in pool]).to(device)
    pool_labels = data.labels[pool].to(device)
    mosaics, cells = build_mosaics(pool_images, pool_labels, predict(model, pool_images, args.batch), args.mosaics, args.seed)
    print(f"\n{path.stem}: {len(indices)} images ({per_class}/class, accuracy {accuracy:.3f}), "
          f"{0 if mosaics is None else len(mosaics)} mosaics", file=sys.stderr, flush=True)

    rows = []
    for name in args.methods:
        fn = explainer(name, model, vit=loaded.vit, batch_size=None, ig_steps=args.ig_steps, seed=args.seed)
        start = time.perf_counter()
        maps = batched(fn, images, predicted, args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / len(indices)
        scores = adcc(model, fn, images, target=predicted, batch_size=args.batch).summary()
        deletion, insertion = deletion_insertion(model, images, maps, predicted, steps=args.steps,
                                                 batch_size=args.batch * 8)
        pointing = float("nan")
        if mosaics is not None:
            pointing = pointing_game(fn, mosaics.to(device), cells.to(device), batch_size=args.batch).mean().item()
        random_fn = explainer(name, random_model, vit=random_vit, ig_steps=args.ig_steps, seed=args.seed + 1)
        sanity = spearman_per_image(maps, batched(random_fn, images, predicted, args.batch))
        row = {"method": name, **scores, "pointing_game": pointing, "deletion_auc": deletion.mean().item(),
               "insertion_auc": insertion.mean().item(), "sanity_spearman": sanity, "ms_per_image": ms}
        rows.append(row)
        print(f"  {name:>16}: ADCC {row['adcc_of_means']:5.1f}  pointing {pointing:.3f}  "
              f"del {row['deletion_auc']:.3f} ins {row['insertion_auc']:.3f}  rho {sanity:+.3f}  {ms:7.1f} ms/img",
              file=sys.stderr, flush=True)
    return {"model": path.stem, "test_acc": loaded.info.get("test_acc"), "images": len(indices),
            "subset_accuracy": accuracy, "mosaics": 0 if mosaics is None else len(mosaics), "rows": rows}


COLUMNS = [
    ("average_drop", "AD %↓", "{:.2f}"), ("average_increase", "AI %↑", "{:.2f}"),
    ("coherency", "Coh %↑", "{:.2f}"), ("complexity", "Com %↓", "{:.2f}"),
    ("adcc_of_means", "ADCC↑ (of means)", "{:.2f}"), ("mean_adcc", "ADCC↑ (mean)", "{:.2f}"),
    ("pointing_game", "Pointing↑", "{:.3f}"), ("deletion_auc", "Deletion↓", "{:.3f}"),
    ("insertion_auc", "Insertion↑", "{:.3f}"), ("sanity_spearman", "Sanity ρ↓", "{:+.3f}"),
    ("ms_per_image", "ms/img", "{:.1f}"),
]


def markdown(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"Device {meta['device']}, torch {meta['torch']}; maps explain the predicted class.", ""]
    for res in results:
        lines += [f"### {res['model']} (test acc {res['test_acc']}; {res['images']} images, "
                  f"subset acc {res['subset_accuracy']:.3f}; {res['mosaics']} mosaics)", ""]
        lines.append("| method | " + " | ".join(c[1] for c in COLUMNS) + " |")
        lines.append("|---|" + "---:|" * len(COLUMNS))
        for row in res["rows"]:
            cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {TITLES[row['method']]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="folder with data/ and models/")
    parser.add_argument("--models", default=None, help="comma list of checkpoint stems (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    parser.add_argument("--per-class", type=int, default=None, help="images per class for every model")
    parser.add_argument("--per-class-32", type=int, default=5, help="default for 32-pixel models")
    parser.add_argument("--per-class-224", type=int, default=3, help="default for 224-pixel models")
    parser.add_argument("--mosaics", type=int, default=12)
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for .md and .json")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")

    shared = Path(args.shared)
    data = CIFAR10JPEG(shared / "data" / "cifar10_jpeg.npz", "test")
    paths = sorted((shared / "models").glob("*.safetensors"))
    if args.models:
        wanted = args.models.split(",")
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        parser.error(f"no checkpoints found in {shared / 'models'}")
    start = time.perf_counter()
    results = [evaluate_model(p, args, data) for p in paths]
    meta = {"device": args.device, "torch": torch.__version__, "seconds": time.perf_counter() - start,
            "args": {k: v for k, v in vars(args).items()}}
    table = markdown(results, meta)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"quality_{torch.device(args.device).type}"
    (out / f"{tag}.md").write_text(table + "\n")
    (out / f"{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"written to {out / tag}.md/.json in {meta['seconds']:.0f} s", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

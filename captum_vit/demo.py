"""``captum-vit demo``: the embedded model explains the bundled images.

Writes one figure per image into the output folder (image, prediction, one
overlay per method, drawn with Captum's ``visualize_image_attr``, each with a
colour bar and its raw score range), plus a class-by-class figure of a 2x2
mosaic of four classes, and prints where the figures are and how long each
method took on this machine (timings are not drawn into the figures: they
depend on what else the machine is doing).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .data import denormalize
from .methods import REGISTRY, TITLES, explainer
from .metrics import make_mosaic
from .models import default_model, sample_images

DEMO_METHODS = ("reciprocam", "agcam", "ig")


def _extra_photo():
    """scikit-image's ``chelsea`` (a cat), if scikit-image is installed."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return None
    return Image.fromarray(data.chelsea())


def run_demo(
    out: Path, device: torch.device = torch.device("cpu"), methods: Sequence[str] = DEMO_METHODS
) -> List[Path]:
    from .visualization import class_grid_figure, explanation_figure

    out.mkdir(parents=True, exist_ok=True)
    loaded = default_model()
    model = loaded.forward.to(device)
    names = loaded.class_names
    fns = {m: explainer(m, model, vit=loaded.vit, normalize=False) for m in methods}
    agnostic = [TITLES[m] for m in methods if not REGISTRY[m].class_specific]
    print(f"model: embedded DeiT-Tiny trained on CIFAR-10 (test accuracy {loaded.info.get('test_acc')}); "
          f"methods: {', '.join(TITLES[m] for m in methods)}")

    pictures, labels = sample_images()
    items = [(f"cifar_{i}_{names[y]}", img, names[y]) for i, (img, y) in enumerate(zip(pictures, labels))]
    photo = _extra_photo()
    if photo is not None:
        items.append(("chelsea", photo, "cat (scikit-image photo, shown to the model at 32x32)"))

    written: List[Path] = []
    totals: Dict[str, List[float]] = {TITLES[m]: [] for m in methods}
    for stem, image, truth in items:
        x = loaded.preprocess(image).to(device)
        with torch.no_grad():
            probs = model(x).float().softmax(-1)[0]
        c = int(probs.argmax())
        maps, times = {}, {}
        for m, fn in fns.items():
            start = time.perf_counter()
            maps[TITLES[m]] = fn(x, torch.tensor([c], device=device)).detach().cpu()[0]
            times[TITLES[m]] = 1000 * (time.perf_counter() - start)
            totals[TITLES[m]].append(times[TITLES[m]])
        path = out / f"{stem}.png"
        title = f"true: {truth}\npredicted: {names[c]} (p={probs[c]:.2f})"
        explanation_figure(denormalize(x[0].cpu()), maps, title, path, class_agnostic=agnostic)
        written.append(path)
        print(f"  {path}  predicted {names[c]:>10} p={probs[c]:.2f}  " +
              "  ".join(f"{k} {v:.0f} ms" for k, v in times.items()))

    # A 2x2 mosaic of four classes, explained class by class.
    picks, seen = [], set()
    for i, y in enumerate(labels):
        if y not in seen:
            picks.append(i)
            seen.add(y)
        if len(picks) == 4:
            break
    tiles = torch.stack([loaded.preprocess(pictures[i])[0] for i in picks])
    mosaic = make_mosaic(tiles)[None].to(device)
    classes = torch.tensor([labels[i] for i in picks], device=device)
    with torch.no_grad():
        mosaic_probs = model(mosaic).float().softmax(-1)[0]
    top = int(mosaic_probs.argmax())
    grid_maps = {}
    for m, fn in fns.items():
        start = time.perf_counter()
        grid_maps[TITLES[m]] = torch.cat([fn(mosaic, classes[j : j + 1]).detach().cpu()[0] for j in range(4)])
        totals[TITLES[m]].append(1000 * (time.perf_counter() - start) / 4)
    path = out / "mosaic_four_classes.png"
    class_grid_figure(denormalize(mosaic[0].cpu()), grid_maps, [names[int(c)] for c in classes],
                      f"2x2 mosaic, one map per class\n(model's top class: {names[top]}, p={mosaic_probs[top]:.2f})", path)
    written.append(path)
    print(f"  {path}  (maps for {', '.join(names[int(c)] for c in classes)}; the model, trained on single "
          f"objects, calls the mosaic {names[top]} p={mosaic_probs[top]:.2f})")
    print("mean time per explanation, measured now on this machine (" + str(device) + "): " +
          ", ".join(f"{k} {sum(v) / len(v):.0f} ms" for k, v in totals.items()))
    print(f"{len(written)} figures written to {out.resolve()}")
    return written

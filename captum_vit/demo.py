"""``captum-vit demo``: the embedded model explains the bundled images.

Writes one figure per image into the output folder (image, prediction, one
overlay per method, drawn with Captum's ``visualize_image_attr``, each with a
colour bar and its raw score range), plus a class-by-class figure of a 2x2
mosaic of four classes, and a known-evidence figure (canvases whose deciding
mark is known, the bundled model trained on them, each method's map with the
true box drawn), and prints where the figures are, each method's evidence
mass on those canvases and how long each method took on this machine
(timings are not drawn into the figures: they depend on what else the
machine is doing).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from .data import denormalize
from .methods import REGISTRY, TITLES, explainer
from .metrics import make_mosaic
from .models import default_model, sample_images

DEMO_METHODS = ("reciprocam", "agcam", "ig")
#: Integrated Gradients' steps in the demo (the registry's default is 50): a quicker demo, said on its figures
DEMO_IG_STEPS = 16


def _extra_photo():
    """scikit-image's ``chelsea`` (a cat), if scikit-image is installed."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return None
    return Image.fromarray(data.chelsea())


#: the known-evidence model the demo explains, and its canvases
EVIDENCE_MODEL, EVIDENCE_CANVASES, EVIDENCE_SEED = "cls4", 4, 11


def _known_evidence(out: Path, device: torch.device, methods: Sequence[str], pictures: list) -> Path:
    """Canvases built on the bundled pictures, where the mark that decides the label is known."""
    import numpy as np

    from .evidence import CLASSES, MARK, load_evidence_model, make_canvases
    from .evidence import denormalize as canvas_pixels
    from .metrics import evidence_mass
    from .visualization import known_evidence_figure, raw_range

    backgrounds = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pictures]))
    batch = make_canvases(backgrounds.permute(0, 3, 1, 2), "single", EVIDENCE_CANVASES, seed=EVIDENCE_SEED)
    model = load_evidence_model(EVIDENCE_MODEL).to(device)
    x = batch.images.to(device)
    truth = torch.tensor([marks[0][0] for marks in batch.boxes])
    with torch.no_grad():
        probs = torch.sigmoid(model(x).float()).cpu()  # trained multi-label: one sigmoid per mark colour
    masks = batch.box_masks()[torch.arange(len(truth)), truth]
    shown = list(methods) + ([] if "random" in methods else ["random"])  # the control beside the methods
    titles = demo_titles(shown)
    maps, masses = {}, {}
    for m in shown:
        # the figure shows raw maps; the mass is taken, as in benchmarks/evidence.py, from the maps as the
        # registry returns them by default
        kw = dict(seed=EVIDENCE_SEED, ig_steps=DEMO_IG_STEPS)
        maps[titles[m]] = explainer(m, model, normalize=False, **kw)(x, truth.to(device)).detach().cpu()
        scaled = explainer(m, model, **kw)(x, truth.to(device)).detach().cpu()
        masses[titles[m]] = evidence_mass(scaled, masks)
    captions = [f"mark: {CLASSES[int(c)]} (p={probs[i, c]:.2f})" for i, c in enumerate(truth)]
    path = out / "known_evidence.png"
    known_evidence_figure(canvas_pixels(batch.images), [marks[0][1] for marks in batch.boxes], captions, maps,
                          masses, path, class_agnostic=[titles[m] for m in shown if not REGISTRY[m].class_specific])
    share = MARK * MARK / batch.images[0, 0].numel()
    print(f"  {path}  (known evidence: model '{EVIDENCE_MODEL}' trained on 64x64 canvases where a {MARK}x{MARK} "
          f"mark's colour decides the label; {EVIDENCE_CANVASES} canvases on the bundled pictures)")
    # a flat map's mass is rounding noise; say how many there were beside the number they feed
    flat = {k: sum(raw_range(m)[2] for m in maps[k]) for k in maps}
    print(f"  evidence mass (share of each map inside the true mark; an even map gets {share:.3f}): " +
          ", ".join(f"{k} {v.mean():.2f}" + (f" ({flat[k]} of {len(v)} maps flat)" if flat[k] else "")
                    for k, v in masses.items()) +
          " -- a few canvases; benchmarks/evidence.py measures it with intervals")
    return path


def _explain_pictures(out: Path, loaded, fns: Dict[str, Any], titles: Dict[str, str], device: torch.device,
                      totals: Dict[str, List[float]]) -> List[Path]:
    """One figure per bundled picture (and scikit-image's cat, if installed): the image and each method's map."""
    from .visualization import explanation_figure

    names, model = loaded.class_names, loaded.forward
    pictures, labels = sample_images()
    items = [(f"cifar_{i}_{names[y]}", img, names[y]) for i, (img, y) in enumerate(zip(pictures, labels))]
    photo = _extra_photo()
    if photo is not None:
        items.append(("chelsea", photo, "cat (scikit-image photo, shown to the model at 32x32)"))
    agnostic = [titles[m] for m in fns if not REGISTRY[m].class_specific]
    written = []
    for stem, image, truth in items:
        x = loaded.preprocess(image).to(device)
        with torch.no_grad():
            probs = model(x).float().softmax(-1)[0]
        c = int(probs.argmax())
        maps, times = {}, {}
        for m, fn in fns.items():
            start = time.perf_counter()
            maps[titles[m]] = fn(x, torch.tensor([c], device=device)).detach().cpu()[0]
            times[titles[m]] = 1000 * (time.perf_counter() - start)
            totals[titles[m]].append(times[titles[m]])
        path = out / f"{stem}.png"
        explanation_figure(denormalize(x[0].cpu()), maps, f"true: {truth}\npredicted: {names[c]} (p={probs[c]:.2f})",
                           path, class_agnostic=agnostic)
        written.append(path)
        print(f"  {path}  predicted {names[c]:>10} p={probs[c]:.2f}  " +
              "  ".join(f"{k} {v:.0f} ms" for k, v in times.items()))
    return written


def _mosaic(out: Path, loaded, fns: Dict[str, Any], titles: Dict[str, str], device: torch.device,
            totals: Dict[str, List[float]]) -> Path:
    """A 2x2 mosaic of four classes, explained class by class."""
    from .visualization import class_grid_figure

    names, model = loaded.class_names, loaded.forward
    pictures, labels = sample_images()
    picks: List[int] = []  # the first image of each of the first four classes
    for i, y in enumerate(labels):
        if len(picks) < 4 and all(labels[j] != y for j in picks):
            picks.append(i)
    mosaic = make_mosaic(torch.stack([loaded.preprocess(pictures[i])[0] for i in picks]))[None].to(device)
    classes = torch.tensor([labels[i] for i in picks], device=device)
    with torch.no_grad():
        mosaic_probs = model(mosaic).float().softmax(-1)[0]
    top = int(mosaic_probs.argmax())
    grid_maps = {}
    for m, fn in fns.items():
        start = time.perf_counter()
        grid_maps[titles[m]] = torch.cat([fn(mosaic, classes[j : j + 1]).detach().cpu()[0] for j in range(4)])
        totals[titles[m]].append(1000 * (time.perf_counter() - start) / 4)
    path = out / "mosaic_four_classes.png"
    class_grid_figure(denormalize(mosaic[0].cpu()), grid_maps, [names[int(c)] for c in classes],
                      f"2x2 mosaic, one map per class\n(model's top class: {names[top]}, p={mosaic_probs[top]:.2f})",
                      path)
    print(f"  {path}  (maps for {', '.join(names[int(c)] for c in classes)}; the model, trained on single "
          f"objects, calls the mosaic {names[top]} p={mosaic_probs[top]:.2f})")
    return path


def run_demo(
    out: Path, device: torch.device = torch.device("cpu"), methods: Sequence[str] = DEMO_METHODS
) -> List[Path]:
    """Explain the bundled pictures, a mosaic and known-evidence canvases with ``methods``; write the figures."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = default_model()
    model = loaded.forward.to(device)
    fns = {m: explainer(m, model, vit=loaded.vit, normalize=False, ig_steps=DEMO_IG_STEPS) for m in methods}
    titles = demo_titles(methods)
    print(f"model: embedded DeiT-Tiny trained on CIFAR-10 (test accuracy {loaded.info.get('test_acc')}); "
          f"methods: {', '.join(titles.values())}")
    totals: Dict[str, List[float]] = {titles[m]: [] for m in methods}
    written = _explain_pictures(out, loaded, fns, titles, device, totals)
    written.append(_mosaic(out, loaded, fns, titles, device, totals))
    written.append(_known_evidence(out, device, methods, pictures=sample_images()[0]))
    print("mean time per explanation, measured now on this machine (" + str(device) + "): " +
          ", ".join(f"{k} {sum(v) / len(v):.0f} ms" for k, v in totals.items()))
    print(f"{len(written)} figures written to {out.resolve()}")
    return written


def demo_titles(methods: Sequence[str]) -> Dict[str, str]:
    """Figure titles: the registry's, and Integrated Gradients with the demo's fewer steps said."""
    return {m: f"{TITLES[m]} ({DEMO_IG_STEPS} steps)" if m == "ig" else TITLES[m] for m in methods}

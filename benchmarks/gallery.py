"""The docs site's gallery: every registry explainer on the bundled pictures and on known-evidence canvases.

    python benchmarks/gallery.py            # runs the demo's figures for every explainer, writes docs/gallery.md
    python benchmarks/gallery.py --check    # exit 1 when docs/gallery.md or its images are not what this writes

The figures are the demo's (`captum_vit.demo.run_demo`: the embedded CIFAR-10 DeiT-Tiny on the eight bundled
pictures, a 2x2 mosaic, and canvases of the known-evidence model ``cls4`` built on the bundled pictures),
once per group of methods so each figure stays readable. Everything they need ships with the package; no
download. ``docs/assets/gallery/manifest.json`` records the methods and files, so a new registry method makes
the gallery stale (``tests/test_docs.py`` checks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.methods import EXPLAINERS, TITLES  # noqa: E402

GALLERY = ROOT / "docs" / "assets" / "gallery"
PAGE = ROOT / "docs" / "gallery.md"
#: drawn by tests/test_docs.py from the tests' models of every family
FAMILY_FIGURE = "families/families.jpg"
#: one figure row per group: ViT-ReciproCAM's settings, then every other explainer
GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("reciprocam", tuple(m for m in EXPLAINERS if m.startswith("reciprocam"))),
    ("others", tuple(m for m in EXPLAINERS if not m.startswith("reciprocam"))),
)


def page(manifest: Dict[str, List[str]]) -> str:
    """docs/gallery.md from the manifest (group -> figure files)."""
    lines = ["# Gallery", "",
             "Every explainer of the registry, as `captum-vit demo` draws them, on what ships with the package: "
             "the embedded DeiT-Tiny trained on CIFAR-10 (four of the bundled test pictures, upsampled to 224 px "
             "inside the model, and a 2x2 mosaic of four of them) and the known-evidence model `cls4` on canvases "
             "built on the bundled pictures, where the coloured mark that decides the label is boxed. Each map "
             "is shown min-max scaled over the picture; its caption gives the raw range. Written by "
             "`python benchmarks/gallery.py`; a test checks this page lists exactly its images.", "",
             "Last, every supported model family on one picture, with **random weights**: trained weights of "
             "most families come only from model hubs, which this project's machines cannot reach. That figure "
             "shows each family's grid and that its map is drawn; it says nothing about what a trained model of "
             "the family attends to. `tests/test_docs.py` draws it (`CAPTUM_VIT_WRITE_GALLERY=1`) from the "
             "tests' small models of every family.", ""]
    for group, files in manifest["groups"].items():
        methods = manifest["methods"][group]
        lines += [f"## {HEADINGS[group]}", "", "Left to right: " + "; ".join(TITLES[m] for m in methods) + ".", ""]
        for name in files:
            lines += [f"![{Path(name).stem} ({group})](assets/gallery/{group}/{name})", ""]
    lines += ["## Every family (random weights)", "",
              "ViT-ReciproCAM at each model's last block (the general path, which runs on every family), "
              "the class the random model predicts.", "", f"![every family](assets/gallery/{FAMILY_FIGURE})", ""]
    return "\n".join(lines)


HEADINGS = {"reciprocam": "ViT-ReciproCAM, every registry setting", "others": "Every other explainer"}
#: the demo's figures the gallery keeps (four pictures, the mosaic, the known-evidence canvases)
KEPT = ("cifar_0_cat", "cifar_1_dog", "cifar_2_ship", "cifar_3_horse", "mosaic_four_classes", "known_evidence")
#: the gallery's images are JPEG at most this wide: the demo's PNGs of 8-15 panels are about 1 MB each
MAX_WIDTH, QUALITY = 2400, 85


def _shrink(png: Path) -> Path:
    from PIL import Image

    with Image.open(png) as image:
        image = image.convert("RGB")
        if image.width > MAX_WIDTH:
            image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
        out = png.with_suffix(".jpg")
        image.save(out, quality=QUALITY, optimize=True)
    png.unlink()
    return out


def build() -> Dict[str, object]:
    from captum_vit.demo import run_demo

    manifest: Dict[str, object] = {"groups": {}, "methods": {}, "command": " ".join(sys.argv)}
    for group, methods in GROUPS:
        start = time.perf_counter()
        folder = GALLERY / group
        for old in folder.glob("*"):
            old.unlink()
        written = run_demo(folder, methods=methods)
        kept = [_shrink(p) for p in written if p.stem in KEPT]
        for p in written:
            if p.exists():
                p.unlink()
        manifest["groups"][group] = sorted(p.name for p in kept)  # type: ignore[index]
        manifest["methods"][group] = list(methods)  # type: ignore[index]
        print(f"{group}: {len(kept)} figures in {time.perf_counter() - start:.0f} s")
    return manifest


def problems() -> List[str]:
    """What makes the gallery stale: a method not shown, an image missing or not listed, the page out of date."""
    path = GALLERY / "manifest.json"
    if not path.exists():
        return [f"{path} is missing: run python benchmarks/gallery.py"]
    manifest = json.loads(path.read_text())
    out = []
    if manifest["methods"] != {g: list(m) for g, m in GROUPS}:
        out.append("the registry's explainers changed since the gallery was drawn: run python benchmarks/gallery.py")
    for group, files in manifest["groups"].items():
        present = sorted(p.name for p in (GALLERY / group).glob("*.jpg"))
        if present != sorted(files):
            out.append(f"docs/assets/gallery/{group} holds {present}, the manifest lists {sorted(files)}")
    if not PAGE.exists() or PAGE.read_text() != page(manifest):
        out.append("docs/gallery.md is not what the manifest gives: run python benchmarks/gallery.py")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check the page and its images")
    args = parser.parse_args()
    if not args.check:
        manifest = build()
        (GALLERY / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        PAGE.write_text(page(manifest))
    found = problems()
    for problem in found:
        print(problem)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

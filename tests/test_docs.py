"""The documentation site builds (mkdocs + mkdocstrings) with the specification and the API reference."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_specification_ships_with_the_project():
    spec = (ROOT / "docs" / "methods.md").read_text()
    for section in ("## 1. ViT-ReciproCAM", "## 2. Attention-Guided Grad-CAM", "## 3. ADCC", "## 4. Baselines",
                    "Transformer Attribution", 'residual="input"'):
        assert section in spec


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("LayerReciproCAM", "AttentionGuidedGradCAM", "TransformerAttribution", "evaluate_adcc", "evaluate",
                 "explanation_figure", "ImageFolderDataset"):
        assert name in api
    for page in ("methods", "getting-started", "evidence", "performance", "quality", "export", "guarantees"):
        assert (site / page / "index.html").exists(), page
    # the docstrings' maths reaches KaTeX: no literal reST role is left, and the renderer ships with the site
    assert ":math:" not in api and ".. math::" not in api
    assert not re.search(r":(meth|func|class|attr|data|mod):", api), "an RST role shows as text on the page"
    assert api.count('class="arithmatex"') >= 30
    for asset in ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js", "fonts/KaTeX_Main-Regular.woff2"):
        assert (site / "assets" / "katex" / asset).exists(), asset
    _check_api_headings(api)
    _check_pages(site)
    shutil.rmtree(site)


def _check_api_headings(api: str) -> None:
    """Every object of the API page under its own heading (not run into the one before), with a signature;
    a Returns paragraph is one table row, not one per line."""
    documented = re.findall(r"^::: (captum_vit[\w.]*)", (ROOT / "docs" / "api.md").read_text(), flags=re.M)
    assert len(documented) >= 15
    for name in documented:
        assert re.search(rf'<h[2-4][^>]*id="{re.escape(name)}"', api), f"{name} has no heading"
    for name in ("captum_vit.LayerReciproCAM.attribute", "captum_vit.AttnLRP.attribute", "captum_vit.LeGrad"):
        assert re.search(rf'<h[3-5][^>]*id="{re.escape(name)}"', api), f"{name} has no heading"
    assert api.count('class="doc-signature') >= 20, "signatures are not shown"
    returns = re.search(r"Returns:.*?</table>", api.split('id="captum_vit.LayerReciproCAM.attribute"')[1], re.S)
    assert returns is not None and returns.group(0).count("<tr") <= 2, "a Returns sentence split into rows"


def _check_pages(site: Path) -> None:
    """No literal Sphinx-style reference on any page; the specification's formulas typeset; the gallery shown."""
    for page in site.rglob("*.html"):
        assert "~captum_vit" not in page.read_text(), f"{page}: a literal ~captum_vit reference"
    spec = (site / "methods" / "index.html").read_text()
    assert spec.count('class="arithmatex"') >= 40, "the specification's formulas are not typeset"
    for formula in ("A = softmax(S)", "y = R_k + ls1(attn(Z_k))", "ADCC = 3 / (1/Coh"):
        assert f"<code>{formula}" not in spec, f"{formula!r} is shown as code, not maths"
    gallery = (site / "gallery" / "index.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', gallery)
    assert len(images) >= 10
    for src in images:
        assert (site / "gallery" / src).resolve().exists(), f"gallery image {src} missing from the site"


def test_the_gallery_shows_every_explainer_and_is_current():
    """docs/gallery.md lists exactly the images benchmarks/gallery.py drew, for the registry's explainers now."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gallery.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_built_site_is_ignored_and_the_changelog_page_is_the_changelog():
    assert "site/" in (ROOT / ".gitignore").read_text().split()
    assert (ROOT / "docs" / "changelog.md").read_text() == (ROOT / "CHANGELOG.md").read_text()


FAMILY_FIGURE = ROOT / "docs" / "assets" / "gallery" / "families" / "families.jpg"
FAMILY_LIST = FAMILY_FIGURE.with_name("families.json")


def _draw_families(names) -> None:
    """Each family's ViT-ReciproCAM map (last block, general path) of one bundled picture, random weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from families import build
    from PIL import Image

    from captum_vit import LayerReciproCAM
    from captum_vit.models import ASSETS
    from captum_vit.visualization import draw_overlay, pyplot

    picture = np.asarray(Image.open(ASSETS / "samples" / "cat_test3009.png").convert("RGB"), dtype=np.float32) / 255
    pixels = F.interpolate(torch.from_numpy(picture).permute(2, 0, 1)[None], size=(64, 64), mode="bilinear")
    image = (pixels[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    plt = pyplot()
    cols = 6
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        model, blocks, _ = build(name)
        with torch.no_grad():
            out = model(pixels * 2 - 1)
        predicted = int((out.logits if hasattr(out, "logits") else out).argmax(1))
        cam = LayerReciproCAM(model, blocks[-1])
        raw = cam.attribute(pixels * 2 - 1, target=predicted, path="general", normalize=False)
        draw_overlay(ax, image, raw[0], name)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    FAMILY_FIGURE.parent.mkdir(parents=True, exist_ok=True)
    png = FAMILY_FIGURE.with_suffix(".png")
    fig.savefig(png, dpi=70, bbox_inches="tight")
    plt.close(fig)
    Image.open(png).convert("RGB").save(FAMILY_FIGURE, quality=85, optimize=True)
    png.unlink()
    FAMILY_LIST.write_text(json.dumps(list(names), indent=2) + "\n")


def test_the_gallery_shows_every_family():
    """docs/gallery.md ends with every family of tests/families.py on one picture (random weights, said on the
    page); CAPTUM_VIT_WRITE_GALLERY=1 draws it again."""
    import os

    from families import FAMILIES

    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    if os.environ.get("CAPTUM_VIT_WRITE_GALLERY") == "1":
        _draw_families(list(FAMILIES))
    assert FAMILY_FIGURE.exists() and FAMILY_FIGURE.stat().st_size > 50_000
    assert json.loads(FAMILY_LIST.read_text()) == list(FAMILIES), (
        "a family was added or renamed: CAPTUM_VIT_WRITE_GALLERY=1 pytest tests/test_docs.py")
    assert "assets/gallery/families/families.jpg" in (ROOT / "docs" / "gallery.md").read_text()

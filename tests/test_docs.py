"""The documentation site builds (mkdocs + mkdocstrings) with the specification and the API reference."""

from __future__ import annotations

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
    shutil.rmtree(site)


def test_the_built_site_is_ignored_and_the_changelog_page_is_the_changelog():
    assert "site/" in (ROOT / ".gitignore").read_text().split()
    assert (ROOT / "docs" / "changelog.md").read_text() == (ROOT / "CHANGELOG.md").read_text()

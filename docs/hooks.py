"""mkdocs hook: docstrings' references to captum_vit objects become links to the API reference.

Docstrings name objects as ``captum_vit.x.Y`` or ``~captum_vit.x.Y`` (the tilde: show only ``Y``), which
mkdocstrings renders as code. After the build, each such code span on every page becomes a link to the
object's heading on the API page when the page documents it; otherwise it keeps its text, without the tilde.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Set

REFERENCE = re.compile(r"<code>(~?)(captum_vit(?:\.[A-Za-z_]\w*)+)</code>")


def _api_anchors(site: Path) -> Set[str]:
    page = site / "api" / "index.html"
    return set(re.findall(r'id="(captum_vit[\w.]*)"', page.read_text())) if page.exists() else set()


def _link(match: "re.Match[str]", anchors: Set[str], to_api: str) -> str:
    tilde, name = match.group(1), match.group(2)
    shown = name.rsplit(".", 1)[-1] if tilde else name
    # a private module's object is documented where the package exports it (captum_vit._x.Y -> captum_vit.Y)
    candidates = [name] + [re.sub(r"\._\w+", "", name)]
    for candidate in candidates:
        if candidate in anchors:
            return f'<a href="{to_api}#{candidate}"><code>{html.escape(shown)}</code></a>'
    return f"<code>{html.escape(shown)}</code>"


def on_post_build(config: Any, **kwargs: Any) -> None:
    site = Path(config["site_dir"])
    anchors = _api_anchors(site)
    for page in site.rglob("*.html"):
        text = page.read_text()
        if "captum_vit" not in text:
            continue
        to_api = os.path.relpath(site / "api" / "index.html", page.parent).replace(os.sep, "/")
        if to_api == "index.html":
            to_api = ""
        page.write_text(REFERENCE.sub(lambda m: _link(m, anchors, to_api), text))

"""What every adapter module shares: the refusal error, and class tests that import nothing."""

from __future__ import annotations

from typing import Any, Sequence


class UnsupportedModelError(TypeError, ValueError):
    """A model, block or attention module that captum_vit cannot explain exactly.

    A ``TypeError``; also a ``ValueError``, which captum_vit 0.1 raised for
    some of these refusals (e.g. a model without a class token).
    """


def lazy_isinstance(module: Any, import_path: str, names: Sequence[str]) -> bool:
    """``isinstance(module, path.name)`` for any of ``names``, without importing an absent library."""
    import importlib
    import sys

    top = import_path.split(".")[0]
    if top not in sys.modules:  # a model of that library exists only if it was imported
        return False
    try:
        lib = importlib.import_module(import_path)
    except Exception:  # noqa: BLE001 - a broken optional library is simply not a match
        return False
    classes = tuple(c for c in (getattr(lib, n, None) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(module, classes)

"""The README's first example runs offline exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_first_readme_example_runs_as_written():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    maps, raw, every = namespace["maps"], namespace["raw"], namespace["every_class"]
    n = len(namespace["labels"])
    assert maps.shape == (n, 1, 14, 14) and every.shape == (n, 10, 14, 14)
    assert namespace["agcam"].shape == (n, 1, 14, 14) and namespace["heat"].shape == (n, 1, 32, 32)
    labels = torch.tensor(namespace["labels"])
    torch.testing.assert_close(maps[:, 0], every[torch.arange(n), labels])  # one pass, every class
    assert 0 < raw.min() and raw.max() < 1  # probabilities, not stretched

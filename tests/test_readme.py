"""Every Python block and every ``captum-vit`` command of the README runs as written.

Offline, the hub loaders are replaced for these tests only: ``timm.create_model(..., pretrained=True)``
builds the same architecture with random weights, transformers' ``from_pretrained`` a small model
of the same class, and open_clip's ``create_model_and_transforms`` its architecture without weights. ``make demo``/``make test`` are what CI runs; ``captum-vit demo`` runs in
``test_wheel.py`` from the built wheel; the ``pip install`` lines are what ``make test`` does.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
COMMANDS = [line for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()
            if line.startswith("captum-vit ")]


@pytest.fixture
def offline_hubs(monkeypatch, tmp_path):
    import timm

    create = timm.create_model

    def random_weights(name, pretrained=False, **kwargs):
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", random_weights)
    transformers = pytest.importorskip("transformers")

    def small(cls, name, *args, **kwargs):
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=128, image_size=224, patch_size=16, num_labels=1000)
        return cls(config)

    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained", classmethod(small))
    open_clip = pytest.importorskip("open_clip")
    create_clip = open_clip.create_model_and_transforms

    def random_clip(name, pretrained=None, **kwargs):
        return create_clip(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", random_clip)
    (tmp_path / "captum_vit").symlink_to(ROOT / "captum_vit")  # the README's paths are repository paths
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_its_blocks():
    assert len(PYTHON_BLOCKS) >= 6 and len(COMMANDS) >= 3
    assert any(c.startswith("captum-vit demo") for c in COMMANDS)
    assert "captum-vit" in (ROOT / "tests" / "test_wheel.py").read_text()  # the demo runs there, from the wheel


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_each_python_block_runs_as_written(index, offline_hubs, capsys):
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(PYTHON_BLOCKS[index], f"README.md block {index}", "exec"), namespace)  # noqa: S102 - our docs
    if index == 0:  # the quickstart: it prints the prediction and writes the overlay, and no map is flat
        assert not [w for w in caught if "flat" in str(w.message)], "the quickstart's first run warns of flat maps"
        printed = capsys.readouterr().out
        assert "predicted: [" in printed and (offline_hubs / "overlay.png").stat().st_size > 10_000
        maps, predicted = namespace["maps"], namespace["predicted"]
        assert maps.shape == (8, 1, 14, 14) and maps.min() >= 0 and maps.max() <= 1
        setting = dict(kernel="dirac", residual="input", scores="logits", normalize=False)
        every = namespace["cam"].attribute_all_classes(namespace["images"], **setting)
        raw = namespace["cam"].attribute(namespace["images"], target=predicted, **setting)
        torch.testing.assert_close(raw[:, 0], every[torch.arange(8), predicted])  # one pass, every class


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("captum-vit demo")])
def test_each_command_runs_as_written(command, offline_hubs):
    from captum_vit import cli

    assert cli.main(shlex.split(command)[1:]) == 0

"""The command line: outputs on good input, one clear line and exit 2 on bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from captum_vit import cli
from captum_vit.models import ASSETS


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "cat.png"
    shutil.copyfile(ASSETS / "samples" / "cat_test3009.png", path)
    return path


def test_explain_writes_overlays_and_maps(sample, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["explain", str(sample), "--method", "reciprocam", "--method", "agcam",
                     "--top-k", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "class cat (3)" in printed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 and "cat_class3.png" in pngs
    maps = np.load(out / "cat_reciprocam_class3.npy")
    assert maps.shape == (14, 14) and 0 <= maps.min() and maps.max() <= 1
    assert cli.main(["explain", str(sample), "--target", "dog", "--out", str(out)]) == 0
    assert (out / "cat_reciprocam_class5.npy").exists()


def test_evaluate_on_a_folder(sample, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted((ASSETS / "samples").glob("*.png"))[:3]:
        shutil.copyfile(f, folder / f.name)
    assert cli.main(["evaluate", "--data", str(folder), "--method", "reciprocam", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 images" in out and "adcc_of_means" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "missing.png"], "missing.png: no such file"),
        (["explain", "{not_image}"], "not an image"),
        (["explain", "{sample}", "--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
        (["explain", "{sample}", "--model", "deit_tiny_patch16_224"], "could not load 'deit_tiny_patch16_224'"),
        (["explain", "{sample}", "--target", "12"], "target 12 is out of range"),
        (["explain", "{sample}", "--target", "unicorn"], "unknown target 'unicorn'"),
        (["explain", "{sample}", "--model", "weights.pth"], "checkpoint weights.pth does not exist"),
        (["explain", "{sample}", "--model", "{sample_ckpt}"], "give the timm architecture"),
        (["evaluate", "--data", "nowhere"], "nowhere: no such file or folder"),
    ],
)
def test_bad_input_is_one_line(argv, message, sample, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    monkeypatch.chdir(tmp_path)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"")
    argv = [a.format(sample=sample, not_image=not_image, sample_ckpt=ckpt) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captum-vit: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_demo_writes_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("captum_vit.demo.DEMO_METHODS", ("reciprocam", "agcam"))  # IG's cost is not under test
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "mosaic_four_classes.png" in figures and "cifar_0_cat.png" in figures and len(figures) >= 9
    assert "figures written to" in capsys.readouterr().out

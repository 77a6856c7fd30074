"""The command line: outputs on good input, one clear line and exit 2 on bad input."""

from __future__ import annotations

import re
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

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
    maps = np.load(out / "cat_reciprocam_class3.npy")  # the raw scores (logits), not stretched to [0, 1]
    from captum_vit.methods import explainer
    from captum_vit.models import default_model

    loaded = default_model()
    raw = explainer("reciprocam", loaded.forward, normalize=False)(loaded.preprocess(str(sample)), torch.tensor([3]))
    assert maps.shape == (14, 14) and maps.max() > maps.min()
    np.testing.assert_allclose(maps, raw[0, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert cli.main(["explain", str(sample), "--target", "DOG", "--out", str(out)]) == 0
    assert (out / "cat_reciprocam_class5.npy").exists()


def test_explain_takes_folders_and_globs_and_lists_the_files_it_skipped(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    samples = sorted((ASSETS / "samples").glob("*.png"))
    shutil.copyfile(samples[0], folder / "a.png")
    shutil.copyfile(samples[1], folder / "more" / "a.png")  # same name, other folder: both kept
    (folder / "broken.png").write_text("not a picture")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    code = cli.main(["explain", str(folder), str(tmp_path / "nothing*.png"), "--batch-size", "2",
                     "--out", str(out), "--method", "rollout"])
    captured = capsys.readouterr()
    assert code == 2
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{stem}_class{c}.png" for stem, c in zip(["a", "a_1"], _predictions(folder))
    )
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "2 input(s) skipped" in err
    assert "broken.png is not a readable image" in err and "nothing*.png (no such file" in err
    assert "Traceback" not in captured.err


def _predictions(folder):
    from captum_vit.models import default_model

    loaded = default_model()
    out = []
    for path in (folder / "a.png", folder / "more" / "a.png"):
        out.append(int(loaded.forward(loaded.preprocess(path)).argmax()))
    return out


@pytest.mark.parametrize(
    "target, expected",
    [("Cat", 3), ("  dog ", 5), ("7", 7)],
)
def test_class_names_are_forgiving(target, expected):
    assert cli.resolve_class(target, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse"], 8) \
        == expected


def test_class_name_synonyms_and_ambiguity():
    names = ["tabby, tabby cat", "tiger cat", "crane", "crane", "Egyptian cat"]
    assert cli.resolve_class("TABBY", names, 5) == 0
    assert cli.resolve_class("tabby cat", names, 5) == 0
    with pytest.raises(cli.UsageError, match="names 2 classes .2: crane; 3: crane."):
        cli.resolve_class("crane", names, 5)
    # a small model's classes are all listed: "Car" finds no name, and the user sees "automobile (1)" among them
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with pytest.raises(cli.UsageError, match=r"unknown target 'Car'; the classes are airplane \(0\), automobile \(1\), "
                                             r"bird \(2\), .*, truck \(9\)\.$"):
        cli.resolve_class("Car", cifar, 10)
    # a large one: names containing the word first, then names spelt alike, case-insensitively
    many = names + ["sports car", "car wheel", "cab, taxi"] + [f"class {i}" for i in range(30)]
    with pytest.raises(cli.UsageError, match=r"close matches: sports car \(5\); car wheel \(6\); cab, taxi \(7\)"):
        cli.resolve_class("Car", many, len(many))
    with pytest.raises(cli.UsageError, match=r"close matches: tabby, tabby cat \(0\)"):
        cli.resolve_class("tabby kat", many, len(many))
    with pytest.raises(cli.UsageError, match=r"give a class index in \[0, 37\] or a class name\.$"):
        cli.resolve_class("unicorn", many, len(many))


def test_evaluate_on_a_folder(sample, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted((ASSETS / "samples").glob("*.png"))[:3]:
        shutil.copyfile(f, folder / f.name)
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["evaluate", str(folder), "--batch", "2", "--checkpoint-dir", str(runs), "--out", str(out)]
    assert cli.main(args + ["--method", "reciprocam"]) == 0
    printed = capsys.readouterr().out
    assert "3 images" in printed and "adcc_of_means" in printed and "the ViT-ReciproCAM paper's Table 1" in printed
    assert sorted(p.name for p in out.iterdir()) == ["per_image.jsonl", "plot.png", "summary.json", "table.md"]
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 3
    assert cli.main(args + ["--method", "reciprocam", "--metric", "deletion"]) == 2  # another run's files: refused
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metrics is ['adcc'] there but ['deletion'] now" in err and "--restart" in err
    assert cli.main(args + ["--method", "reciprocam-fast", "--metric", "deletion", "--restart"]) == 0
    assert cli.main(args + ["--use-labels"]) == 2
    assert "--use-labels needs labels" in capsys.readouterr().err
    assert cli.main(["evaluate", "--data", str(folder), "--method", "rollout", "--metric", "constant",
                     "--out", str(out)]) == 0  # --data, as before


def _class_tree(tmp_path, pictures):
    """``tmp_path/tree/<folder>/<picture>``: a bundled picture in each class folder (``{folder: picture}``)."""
    tree = tmp_path / "tree"
    for folder, name in pictures.items():
        (tree / folder).mkdir(parents=True)
        shutil.copyfile(ASSETS / "samples" / name, tree / folder / name)
    return tree


def test_evaluate_on_a_class_folder_tree_with_several_methods_and_metrics(tmp_path, capsys):
    tree = _class_tree(tmp_path, {"cat": "cat_test3009.png", "ship": "ship_test8001.png"})
    out = tmp_path / "out"
    code = cli.main(["evaluate", str(tree), "--use-labels", "--method", "rollout", "--method", "reciprocam-fast",
                     "--metric", "deletion", "--metric", "constant", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert set(summary) == {"rollout", "reciprocam-fast"} and {"insertion", "constant"} <= set(summary["rollout"])
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["method"] for r in records} == {"rollout", "reciprocam-fast"}
    assert "| method | deletion↓ | insertion↑ | constant↓ |" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "missing.png"], "missing.png: no such file"),
        (["explain", "{not_image}"], "notes.png is not a readable image"),
        (["explain", "{sample}", "--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
        (["explain", "{sample}", "--model", "deit_tiny_patch16_224"], "pretrained weights for 'deit_tiny_patch16_224' are not in the local cache"),
        (["explain", "{sample}", "--target", "12"], "target 12 is out of range"),
        (["explain", "{sample}", "--target", "unicorn"], "unknown target 'unicorn'"),
        (["explain", "{sample}", "--model", "weights.pth"], "checkpoint weights.pth does not exist"),
        (["explain", "{sample}", "--model", "{sample_ckpt}"], "give the timm architecture"),
        (["explain", "{sample}", "--model", "{text_pth}", "--arch", "deit_tiny_patch16_224"],
         "text.pth is not a checkpoint (no torch.save or pickle header); accepted: a state dict"),
        (["explain", "{sample}", "--model", "{text_safetensors}"], "text.safetensors is not a .safetensors checkpoint"),
        (["explain", "{sample}", "--model", "{whole_model}", "--arch", "deit_tiny_patch16_224"],
         "holds pickled Python objects besides tensors (a whole model saved with torch.save(model)?)"),
        (["evaluate", "--data", "nowhere"], "nowhere: no such file or folder"),
        (["explain", "{folder}"], "no such file, or no images in it"),
        (["explain", "{sample}", "--out", "{sample}"], "is a file; give a folder"),
        (["explain", "{sample}", "--out", "/dev/null/out"], "cannot create the output folder /dev/null/out"),
        (["demo", "--out", "/dev/null/out"], "cannot create the output folder /dev/null/out"),
        (["evaluate", "--data", "{folder}", "--checkpoint-dir", "{sample}"], "is a file; give a folder"),
        (["evaluate", "--data", "{bad_npz}"], "lacks test_jpeg, test_offsets, y_test, classes"),
        (["evaluate", "--data", "{not_npz}"], "cannot be read as an .npz archive"),
        (["evaluate", "--data", "{folder}", "--limit", "-5"], "expected a positive integer, got -5"),
        (["explain", "{sample}", "--top-k", "0"], "expected a positive integer, got 0"),
    ],
)
def test_bad_input_is_one_line(argv, message, sample, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    monkeypatch.chdir(tmp_path)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    ckpt = tmp_path / "mine.pth"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    text_pth, text_safetensors, whole_model = tmp_path / "text.pth", tmp_path / "text.safetensors", tmp_path / "m.pth"
    text_pth.write_text("not a checkpoint")
    text_safetensors.write_text("not a checkpoint either")
    torch.save(torch.nn.Linear(2, 2), whole_model)
    folder = tmp_path / "empty"
    folder.mkdir()
    bad_npz = tmp_path / "other.npz"
    np.savez(bad_npz, x=np.zeros(3))
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("not an archive")
    argv = [a.format(sample=sample, not_image=not_image, sample_ckpt=ckpt, folder=folder, bad_npz=bad_npz,
                     not_npz=not_npz, text_pth=text_pth, text_safetensors=text_safetensors, whole_model=whole_model)
            for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses bad option values itself
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captum-vit: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_demo_writes_figures(tmp_path, capsys, monkeypatch):
    # IG's cost is not under test
    assert cli.main(["demo", "--out", str(tmp_path), "--method", "reciprocam", "--method", "agcam"]) == 0
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "mosaic_four_classes.png" in figures and "cifar_0_cat.png" in figures and len(figures) >= 9
    assert "known_evidence.png" in figures
    out = capsys.readouterr().out
    assert "figures written to" in out
    # the known-evidence line names every method and the random control with a number each
    line = next(x for x in out.splitlines() if "evidence mass (share of each map inside the true mark" in x)
    for title in ("ViT-ReciproCAM", "AGCAM", "random control"):
        assert re.search(rf"{title} \d\.\d\d", line), line


def test_preprocessing_is_timms_transform_for_a_deit(tmp_path):
    """resize 248 (shorter side, bicubic), centre crop 224, ImageNet normalisation: what timm's DeiT-S expects."""
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms

    from captum_vit.models import load_model

    weights = tmp_path / "deit.pth"
    torch.save(timm.create_model("deit_small_patch16_224").state_dict(), weights)
    loaded = load_model(str(weights), arch="deit_small_patch16_224")
    photo = Image.fromarray((np.random.default_rng(0).random((300, 450, 3)) * 255).astype(np.uint8))  # not square
    expected = transforms.Compose([
        transforms.Resize(248, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])(photo)
    got = loaded.preprocess(photo)
    assert got.shape == (1, 3, 224, 224)
    torch.testing.assert_close(got[0], expected)


def test_negative_block_indices_work_as_separate_arguments_as_the_help_shows(tmp_path):
    """``--layers -1,-2`` (the help's own example) and ``--block -3`` without ``=``."""
    from captum_vit.cli import attach_negative_values, main

    assert attach_negative_values(["explain", "a.png", "--layers", "-1,-2", "--block", "-3", "--top-k", "2"]) == [
        "explain", "a.png", "--layers=-1,-2", "--block=-3", "--top-k", "2"]
    assert attach_negative_values(["--out", "-1"]) == ["--out", "-1"]  # only the block options
    image = str(ASSETS / "samples" / "cat_test3009.png")
    assert main(["explain", image, "--method", "agcam", "--layers", "-1,-2", "--out", str(tmp_path)]) == 0
    assert main(["explain", image, "--method", "reciprocam", "--block", "-3", "--out", str(tmp_path)]) == 0


def test_method_flags_are_the_registry_options():
    """Every option a registry method takes is a flag, read as the registry reads it, and reaches exactly the
    chosen methods that take it (keep_prefix_tokens had no flag while the CLI kept its own list)."""
    from captum_vit.methods import OPTIONS, REGISTRY

    parser = cli.build_parser()
    for spec in REGISTRY.values():
        for option in spec.options:
            assert OPTIONS[option.name] is option, f"{option.name}: one spec per option name"
    args = parser.parse_args(cli.attach_negative_values(
        ["explain", "x.png", "--method", "reciprocam", "--method", "legrad", "--method", "attnlrp",
         "--keep-prefix-tokens", "no",
         "--layers", "-1", "--pooling", "model", "--attention-rule", "attnlrp", "--linear-gamma", "0.1"]))
    options = cli.method_options(args, ["reciprocam", "legrad", "attnlrp"])
    assert options == {"reciprocam": {"keep_prefix_tokens": False},
                       "legrad": {"layers": [-1], "pooling": "model"},
                       "attnlrp": {"attention_rule": "attnlrp", "linear_gamma": 0.1}}
    args = parser.parse_args(["explain", "x.png", "--method", "agcam", "--pooling", "model"])
    with pytest.raises(cli.UsageError, match="--pooling is an option of legrad; add one of them with --method"):
        cli.method_options(args, ["agcam"])
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "x.png", "--keep-prefix-tokens", "maybe"])


def test_each_registry_option_is_accepted_by_its_builder():
    """A flag the CLI offers must build: each method with each of its options at a valid value."""
    from captum_vit import methods
    from captum_vit.models import default_model

    model = default_model().forward
    valid = {"block": -1, "kernel": "dirac", "residual": "input", "scores": "logits", "keep_prefix_tokens": False,
             "layers": [-1], "attention_rule": "attnlrp", "linear_gamma": 0.1, "conv_gamma": 0.5, "space": "grid",
             "pooling": "model"}
    assert set(valid) == set(methods.OPTIONS)
    for name, spec in methods.REGISTRY.items():
        for option in spec.options:
            built = methods.explainer(name, model, **{option.name: valid[option.name]})
            assert built.options[option.name] == valid[option.name]


def test_evaluate_reads_folders_that_name_no_class_unless_labels_are_asked_for(tmp_path, capsys):
    """Without --use-labels the labels are not used, so folders that match no class name are read unlabelled;
    with it they are refused, naming the folders."""
    tree = _class_tree(tmp_path, {"house_cats": "cat_test3009.png", "boats": "ship_test8001.png"})
    args = ["evaluate", str(tree), "--method", "rollout", "--metric", "constant", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    assert "2 images" in capsys.readouterr().out
    assert cli.main(args + ["--use-labels"]) == 2
    assert "class folder(s)" in capsys.readouterr().err


def test_imagenet_wordnet_folders_take_timm_imagenet_classes(tmp_path):
    """ImageNet-val arrives as WordNet-id folders: with a 1000-class model they are its classes, in timm's
    ImageNet order (timm.data.ImageNetInfo)."""
    from timm.data import ImageNetInfo

    from captum_vit.data import ImageFolderDataset

    synsets = ImageNetInfo().label_names()
    for k in (0, 281, 999):  # tench, tabby cat, toilet tissue
        (tmp_path / synsets[k]).mkdir()
        shutil.copyfile(ASSETS / "samples" / "cat_test3009.png", tmp_path / synsets[k] / "a.png")
    names = [f"class {k}" for k in range(1000)]  # names that match no folder: the ids decide
    dataset = ImageFolderDataset(tmp_path, lambda image: torch.zeros(3, 8, 8), class_names=names)
    assert sorted(dataset.labels) == [0, 281, 999]
    assert {p.parent.name: label for p, label in zip(dataset.paths, dataset.labels)}[synsets[281]] == 281


def test_unreadable_images_follow_one_rule_and_the_limit_counts_images_explained(tmp_path, capsys):
    """explain and evaluate both explain the readable images, write them, list the skipped ones on stderr and exit
    2; --limit N explains N images even when unreadable ones come first."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "0_broken.png").write_bytes(b"not a picture")
    for f in sorted((ASSETS / "samples").glob("*.png"))[:3]:
        shutil.copyfile(f, folder / f.name)
    out = tmp_path / "out"
    code = cli.main(["evaluate", str(folder), "--limit", "2", "--method", "rollout", "--metric", "constant",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "2 images" in captured.out
    assert "1 input(s) skipped" in captured.err and "0_broken.png" in captured.err
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 2
    code = cli.main(["explain", str(folder), "--method", "rollout", "--out", str(tmp_path / "explained")])
    captured = capsys.readouterr()
    assert code == 2 and "1 input(s) skipped" in captured.err and "0_broken.png" in captured.err
    assert len(list((tmp_path / "explained").glob("*.png"))) == 3


def test_per_image_records_name_the_file_label_target_and_prediction(tmp_path, capsys):
    tree = _class_tree(tmp_path, {"cat": "cat_test3009.png", "ship": "ship_test8001.png"})
    out = tmp_path / "out"
    assert cli.main(["evaluate", str(tree), "--method", "rollout", "--metric", "constant", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    by_file = {Path(r["path"]).name: r for r in records}
    assert set(by_file) == {"cat_test3009.png", "ship_test8001.png"}
    cat = by_file["cat_test3009.png"]
    assert cat["label_name"] == "cat" and cat["target"] == cat["predicted"]  # no --use-labels: the prediction
    assert {"index", "label", "target", "predicted", "target_name", "predicted_name", "method"} <= set(cat)
    assert "on the embedded DeiT-Tiny (CIFAR-10), 2 images" in (out / "table.md").read_text()
    assert "evaluate --data" not in cli.__doc__

"""The evaluation runner: today's results through it, the data users have, several methods and metrics, resume,
bounded memory, checkpoints of fine-tuned models."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_model, randomize
from PIL import Image

from captum_vit.methods import explainer
from captum_vit.metrics import EvaluationBatch, evaluate, evaluate_adcc, evaluate_known_evidence

REFERENCE = Path(__file__).resolve().parent / "data" / "evaluation_reference.pt"
ASSETS = Path(__file__).resolve().parents[1] / "captum_vit" / "assets" / "samples"


@contextlib.contextmanager
def one_thread():
    """The reference was computed with one thread (matrix products may sum in another order with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _adcc_data():
    model, _ = make_model("vit_reg4")
    g = torch.Generator().manual_seed(3)
    data = torch.randn(10, 3, 64, 64, generator=g)
    labels = torch.randint(0, 10, (10,), generator=g)
    return model, data, labels, [(data[i : i + 2], labels[i : i + 2]) for i in range(0, 10, 2)]


def _same_as_reference(value, reference, where):
    """Equal up to another CPU's rounding. The reference was written on an AMD EPYC; on an Intel Xeon the same
    code differs by up to 3e-4 (one thread both): this untrained model's ViT-ReciproCAM maps are nearly flat,
    so rounding reorders near-ties in the deletion order and Spearman's ranks. A changed computation moves
    these fractions of 5-10 images by far more (a flipped pointing or constant-map decision: 0.1 or more)."""
    torch.testing.assert_close(value, reference, rtol=0, atol=1e-3, equal_nan=True, msg=lambda m: f"{where}: {m}")


def test_evaluate_adcc_and_known_evidence_give_the_results_they_gave_before_the_runner():
    """tests/data/evaluation_reference.pt: both functions' outputs with captum_vit's previous implementations."""
    from timm.models.vision_transformer import VisionTransformer

    reference = torch.load(REFERENCE)
    model, _, _, loader = _adcc_data()
    with one_thread():
        # the reference was written when the registry's "reciprocam" was the authors' setting, now
        # "reciprocam-authors": the same maps under its new name
        for name, written_as in (("reciprocam-authors", "reciprocam"), ("random", "random")):
            for use_labels in (False, True):
                result = evaluate_adcc(model, explainer(name, model), loader, use_labels=use_labels, progress=False)
                for field, value in vars(result).items():
                    _same_as_reference(value, reference[f"adcc/{written_as}/{use_labels}/{field}"],
                                       (name, use_labels, field))
        torch.manual_seed(0)
        canvas = randomize(VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                             mlp_ratio=2.0, num_classes=6))
        backgrounds = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        result = evaluate_known_evidence(canvas, ["reciprocam-authors", "rollout", "random"], backgrounds, n=5,
                                         batch_size=2, progress=False)
    assert list(result.values) == ["reciprocam-authors", "rollout", "random"]  # none refused
    for method, fields in result.values.items():
        written_as = "reciprocam" if method == "reciprocam-authors" else method
        assert sorted(fields) == sorted(k.split("/", 2)[2] for k in reference if k.startswith(f"evidence/{written_as}/"))
        for field, value in fields.items():
            _same_as_reference(value, reference[f"evidence/{written_as}/{field}"], (method, field))


def test_several_methods_and_metrics_in_one_run_equal_their_runs_alone():
    model, data, labels, _ = _adcc_data()
    dataset = torch.utils.data.TensorDataset(data, labels)
    methods = ["reciprocam-fast", "rollout", "random"]
    together = evaluate(model, methods, dataset, ["adcc", "deletion", "constant"], batch_size=4, progress=False,
                        deletion_steps=4)
    assert list(together.values) == methods and torch.equal(together.indices, torch.arange(10))
    assert {"adcc", "average_drop", "deletion", "insertion", "constant"} <= set(together.values["rollout"])
    for method in methods[:2]:  # the random control's maps depend on the draws other metrics made before
        alone = evaluate(model, [method], dataset, ["deletion"], batch_size=4, progress=False, deletion_steps=4)
        torch.testing.assert_close(alone.values[method]["insertion"], together.values[method]["insertion"])
    summary = together.summary()
    assert summary["rollout"]["deletion"]["higher_is_better"] is False and summary["rollout"]["adcc"]["n"] == 10


def _tree(root: Path, folders):
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            Image.open(ASSETS / name).save(root / folder / name)
    return root


def test_image_folder_labels_come_from_class_subfolders_matched_by_name_or_sorted_index(tmp_path):
    from captum_vit.data import ImageFolderDataset
    from captum_vit.models import default_model

    loaded = default_model()
    root = _tree(tmp_path / "tree", {"Cat": ["cat_test3009.png"], "ship": ["ship_test8001.png", "airplane_test0.png"]})
    (root / "ship" / "broken.png").write_text("not an image")
    by_name = ImageFolderDataset(root, loaded.transform, class_names=loaded.class_names)
    assert by_name.labels == [3, 8, 8] and len(by_name) == 3  # cat is class 3, ship 8; case does not matter
    assert len(by_name.skipped) == 1 and "broken.png" in by_name.skipped[0]
    by_order = ImageFolderDataset(root, loaded.transform, class_names=loaded.class_names, label_order="sorted")
    assert by_order.labels == [0, 1, 1]
    (root / "kitty").mkdir()
    Image.open(ASSETS / "cat_test3009.png").save(root / "kitty" / "a.png")
    with pytest.raises(ValueError, match="1 class folder.* name no class of the model: kitty.*--label-order sorted"):
        ImageFolderDataset(root, loaded.transform, class_names=loaded.class_names)
    result = evaluate(loaded.forward, ["rollout"], by_name, ["constant"], use_labels=True, batch_size=2,
                      progress=False, transform=None)
    assert len(result.indices) == 3
    flat = ImageFolderDataset(root / "ship", loaded.transform, class_names=loaded.class_names)
    assert flat.labels == [-1, -1]  # no subfolders: no labels, the predictions are explained
    with pytest.raises(ValueError, match="use_labels=True needs labelled data"):
        evaluate(loaded.forward, ["rollout"], flat, ["constant"], use_labels=True, progress=False)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_datasets_of_pictures_and_dict_rows_go_through_the_models_transform():
    from captum_vit.models import default_model

    loaded = default_model()
    pictures = [Image.open(p).convert("RGB") for p in sorted(ASSETS.glob("*.png"))[:3]]
    rows = _Items([{"image": p, "label": i} for i, p in enumerate(pictures)])  # rows as Hugging Face datasets has them
    pairs = _Items([(p, i) for i, p in enumerate(pictures)])  # as torchvision datasets without a transform
    a = evaluate(loaded.forward, ["rollout"], rows, ["constant"], transform=loaded.transform, progress=False)
    b = evaluate(loaded.forward, ["rollout"], pairs, ["constant"], transform=loaded.transform, progress=False)
    torch.testing.assert_close(a.values["rollout"]["constant"], b.values["rollout"]["constant"])
    with pytest.raises(TypeError, match="pass transform="):
        evaluate(loaded.forward, ["rollout"], rows, ["constant"], progress=False)


def test_boxes_from_json_or_csv_follow_the_centre_crop(tmp_path):
    from captum_vit.data import read_boxes, timm_box_mapping

    (tmp_path / "b.json").write_text(json.dumps({"a/x.png": [[10, 20, 110, 60]]}))
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1\na/x.png,10,20,110,60\n")
    assert read_boxes(tmp_path / "b.json") == read_boxes(tmp_path / "b.csv") == {"a/x.png": [(10, 20, 110, 60)]}
    move = timm_box_mapping({"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "center"})
    # a 512x256 picture: shorter side 256 -> 256 (no scaling), longer 512; a centre crop of 224: 144 px off x, 16 off y
    assert move((10, 20, 110, 60), (512, 256)) == (0, 4, 0, 44)
    assert move((200, 100, 300, 200), (512, 256)) == (56, 84, 156, 184)
    with pytest.raises(ValueError, match="crop_mode is 'squash'"):
        timm_box_mapping({"input_size": (3, 224, 224), "crop_mode": "squash"})


def test_localisation_metrics_read_the_boxes():
    model, data, labels, _ = _adcc_data()
    boxes = [[(0, 0, 32, 32)] for _ in range(10)]
    batches = [EvaluationBatch(data[i : i + 5], labels[i : i + 5], boxes[i : i + 5]) for i in (0, 5)]
    result = evaluate(model, ["rollout"], batches, ["pointing", "evidence_mass", "iou"], progress=False)
    assert {"pointing", "evidence_mass", "iou", "dice"} <= set(result.values["rollout"])
    with pytest.raises(ValueError, match="needs ground-truth boxes"):
        evaluate(model, ["rollout"], [data[:2]], ["pointing"], progress=False)


class _Interrupting(torch.utils.data.Dataset):
    def __init__(self, data, labels, fail_at=None):
        self.data, self.labels, self.fail_at = data, labels, fail_at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt  # the run is stopped while loading this image
        return self.data[i], self.labels[i]


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    model, data, labels, _ = _adcc_data()
    kw = dict(metrics=["adcc", "constant"], batch_size=2, progress=False, checkpoint_dir=tmp_path, use_labels=True)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ["reciprocam-fast"], _Interrupting(data, labels, fail_at=6), **kw)
    folder = tmp_path / "reciprocam-fast"
    done = {p.name: p.stat().st_ino for p in folder.glob("batch_*.pt")}
    assert sorted(done) == ["batch_00000.pt", "batch_00001.pt", "batch_00002.pt"]
    resumed = evaluate(model, ["reciprocam-fast"], _Interrupting(data, labels), **kw)
    assert all(folder.joinpath(name).stat().st_ino == ino for name, ino in done.items()), "a finished batch was redone"
    whole = evaluate(model, ["reciprocam-fast"], _Interrupting(data, labels), **dict(kw, checkpoint_dir=None))
    for field, value in whole.values["reciprocam-fast"].items():
        assert torch.equal(resumed.values["reciprocam-fast"][field], value), field


MEMORY_PROBE = textwrap.dedent('''
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_model
    from captum_vit.metrics import evaluate

    class Generated(torch.utils.data.Dataset):  # each image made when it is read: nothing is held
        def __init__(self, n):
            self.n = n
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)), i % 10

    model, _ = make_model("vit_reg4")
    evaluate(model, ["random"], Generated(64), ["constant"], batch_size=32, progress=False)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = evaluate(model, ["random"], Generated({n}), ["constant"], batch_size=32, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(result.indices), (after - before) / 1024)
''')


def test_memory_is_bounded_by_the_batch_not_the_dataset():
    n = 4000  # 4000 images of 3x64x64 floats: 188 MiB if they were held at once
    probe = MEMORY_PROBE.format(tests=str(Path(__file__).resolve().parent), n=n)
    # glibc raises its mmap threshold each time a large block is freed, after which same-sized blocks (a batch
    # of images) come from the heap and fragment it: the peak then grows 50-180 MiB over this run with nothing
    # held (measured; it varies from run to run). A fixed threshold measures what the run holds.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    count, growth_mib = int(out[0]), float(out[1])
    assert count == n
    assert growth_mib < 40, f"peak memory grew by {growth_mib:.0f} MiB over a {n}-image run"


def test_a_fine_tuned_checkpoint_loads_with_its_own_class_count_and_a_wrong_one_is_named(tmp_path):
    import timm

    from captum_vit.models import ModelSpecError, load_model

    torch.save(timm.create_model("deit_tiny_patch16_224", num_classes=10).state_dict(), tmp_path / "fine_tuned.pth")
    assert load_model(str(tmp_path / "fine_tuned.pth"), arch="deit_tiny_patch16_224").vit.num_classes == 10
    with pytest.raises(ModelSpecError, match=r"shapes do not fit 'deit_small_patch16_224'.*cls_token \(1, 1, 192\)"):
        load_model(str(tmp_path / "fine_tuned.pth"), arch="deit_small_patch16_224")
    with pytest.raises(ModelSpecError, match=r"does not fit the timm architecture 'resnet18': \d+ key\(s\) missing"):
        load_model(str(tmp_path / "fine_tuned.pth"), arch="resnet18")


def test_each_registry_method_is_built_once_per_run_and_the_random_control_once_per_batch(monkeypatch):
    """Built once, an engine keeps what it learnt (ViT-ReciproCAM's fast-path verdicts); the random control is
    re-seeded per batch so that a sharded run equals a single process."""
    import captum_vit.methods as methods
    from captum_vit.metrics import evaluate

    model, images = make_model("vit_reg4")
    images = torch.cat([images, images.flip(0), images.flip(-1)])
    built = []
    real = methods.explainer
    monkeypatch.setattr(methods, "explainer", lambda name, *a, **k: built.append(name) or real(name, *a, **k))
    batches = [images[:2], images[2:4], images[4:6]]
    evaluate(model, ["reciprocam-fast", "random"], batches, ["constant"], progress=False)
    assert built.count("reciprocam-fast") == 1
    assert built.count("random") == 1 + len(batches)  # the probe, then one per batch


def test_every_metric_field_is_described_once_and_an_unknown_one_is_an_error():
    from captum_vit.metrics import FIELDS, METRICS, field_spec

    def higher_is_better(name):
        return field_spec(name).higher_is_better

    for spec in METRICS.values():
        assert spec.fields, f"{spec.name} describes none of its fields"
        for f in spec.fields:
            assert f.description and field_spec(f.name.format(stage="blocks.0")) is f
    assert higher_is_better("spearman/blocks.3") is False and higher_is_better("deletion") is False
    assert higher_is_better("grid_pointing") is True and FIELDS["distractor_mass"][1] is False
    with pytest.raises(KeyError, match="no registry metric returns a field 'made_up'"):
        field_spec("made_up")

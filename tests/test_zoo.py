"""The known-evidence zoo, leave-one-model-out selection and the grid pointing game."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from captum_vit.evidence import (
    EVIDENCE_MODELS,
    OBJECT,
    OBJECT_CLASSES,
    build_evidence_model,
    denormalize,
    evidence_model_path,
    held_out_data,
    held_out_scores,
    load_evidence_model,
    make_object_canvases,
)
from captum_vit.metrics import (
    build_pointing_grids,
    evaluate_grid_pointing,
    grid_scores,
    leave_one_model_out,
    make_pointing_grids,
    rank_candidates,
)

from conftest import shared_path


# --- the zoo ------------------------------------------------------------------------------------------------

def test_the_zoo_spans_depths_widths_layouts_tasks_and_certainties():
    specs = EVIDENCE_MODELS.values()
    assert len(EVIDENCE_MODELS) >= 8
    assert {4, 8, 12} <= {s.depth for s in specs}
    assert min(s.width for s in specs) == 96 and max(s.width for s in specs) == 192
    assert {"class", "class+distillation", "class+registers", "none"} <= {s.prefix for s in specs}
    assert sum(s.task == "objects" for s in specs) >= 2
    assert any(s.label_smoothing > 0 for s in specs)


@pytest.mark.parametrize("name", list(EVIDENCE_MODELS))
def test_each_zoo_model_loads_with_its_layout(name):
    spec, model = EVIDENCE_MODELS[name], load_evidence_model(name)
    prefix = {"class": 1, "class+distillation": 2, "class+registers": 5, "none": 0}[spec.prefix]
    assert len(model.blocks) == spec.depth and model.embed_dim == spec.width
    assert model.num_prefix_tokens == prefix and model.num_classes == len(spec.classes)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, len(spec.classes))


def test_unknown_zoo_model_is_refused_with_the_names():
    with pytest.raises(ValueError, match="unknown known-evidence model 'cls5'; choose one of cls4, cls8"):
        load_evidence_model("cls5")
    with pytest.raises(ValueError, match="choose one of"):
        build_evidence_model("cls5")


@pytest.mark.skipif(not shared_path("data", "cifar10_jpeg.npz").exists(), reason="needs ../shared/data")
def test_each_zoo_model_scores_what_its_card_says():
    """The accuracies and certainty stored with each model (its card) are what the held-out canvases give."""
    npz = str(shared_path("data", "cifar10_jpeg.npz"))
    data = {task: held_out_data(npz, task) for task in ("marks", "objects")}
    card = (evidence_model_path("cls4").parent / "MODEL_CARD.md").read_text()
    for name, spec in EVIDENCE_MODELS.items():
        with safe_open(str(evidence_model_path(name)), "pt") as f:
            metadata = f.metadata()
        scores = held_out_scores(load_evidence_model(name), spec.task, data[spec.task])
        for key, value in scores.items():
            stored = float(metadata[key if key == "certainty" else f"acc_{key}"])
            # the stored figures come from these fp16 weights; another CPU may round a near-tie the other way
            # (0.005: five of 1024 canvases)
            assert abs(value - stored) <= 0.005, f"{name} {key}: {value:.4f} vs stored {stored:.4f}"
        assert f"| `{name}` |" in card, f"{name} has no row in MODEL_CARD.md"


def test_object_canvases_paste_the_picture_in_its_box():
    pictures = torch.randint(0, 256, (10, 3, OBJECT, OBJECT), dtype=torch.uint8)
    labels = torch.arange(10)
    batch = make_object_canvases(pictures, labels, torch.rand(4, 3, 32, 32), 24, seed=3)
    assert batch.images.shape == (24, 3, 64, 64) and batch.labels.shape == (24, len(OBJECT_CLASSES))
    pixels = denormalize(batch.images)
    for i, [(c, (x0, y0, x1, y1))] in enumerate(batch.boxes):
        assert x1 - x0 == OBJECT and y1 - y0 == OBJECT and batch.labels[i].argmax() == c
        torch.testing.assert_close(pixels[i, :, y0:y1, x0:x1], pictures[c].float() / 255, atol=1e-6, rtol=0)
    again = make_object_canvases(pictures, labels, torch.rand(4, 3, 32, 32), 24, seed=3)
    assert again.boxes == batch.boxes
    with pytest.raises(ValueError, match=r"pictures must be \(M, 3, 32, 32\)"):
        make_object_canvases(pictures[:, :, :16], labels, pictures, 2)
    with pytest.raises(ValueError, match=r"labels must be \(10,\), one per picture"):
        make_object_canvases(pictures, labels[:3], pictures, 2)


# --- leave-one-model-out --------------------------------------------------------------------------------------

def _values(*pointing):
    return {"pointing": torch.tensor(pointing, dtype=torch.float32),
            "evidence_mass": torch.tensor(pointing, dtype=torch.float32) / 2}


def test_leave_one_model_out_on_two_models_scores_each_on_the_choice_of_the_other():
    # "a" is best on model A, "b" on model B: each fold must take the other model's winner
    scores = {"A": {"a": _values(1, 1, 1, 1), "b": _values(0, 0, 1, 0)},
              "B": {"a": _values(0, 1, 0, 0), "b": _values(1, 1, 1, 0)}}
    folds = leave_one_model_out(scores, keys=("pointing",))
    assert [(f.held_out, f.training, f.chosen, f.fallback) for f in folds] == [
        ("A", ("B",), "b", False), ("B", ("A",), "a", False)]
    assert folds[0].values["pointing"].tolist() == [0, 0, 1, 0]  # b on A: 0.25, though a scores 1.0 there
    assert folds[0].summary()["pointing"]["mean"] == 0.25 and folds[1].summary()["pointing"]["mean"] == 0.25
    with pytest.raises(ValueError, match="at least two models"):
        leave_one_model_out({"A": scores["A"]})


def test_ranking_breaks_ties_with_the_next_key_and_needs_half_the_models():
    scores = {"A": {"x": _values(1, 0), "y": {"pointing": torch.tensor([1.0, 0.0]), "evidence_mass": torch.ones(2)},
                    "z": _values(1, 1)},
              "B": {"x": _values(1, 0), "y": {"pointing": torch.tensor([0.0, 1.0]), "evidence_mass": torch.ones(2)}},
              "C": {"x": _values(1, 0), "y": {"pointing": torch.tensor([1.0, 0.0]), "evidence_mass": torch.ones(2)}}}
    ranking = rank_candidates(scores, ["A", "B", "C"], keys=("pointing", "evidence_mass"))
    # z runs on one of three models: not ranked; x and y tie on pointing (0.5), y has more mass
    assert [name for name, _ in ranking] == ["y", "x"]
    assert ranking[0][1] == (0.5, 1.0)


def test_a_choice_that_refuses_the_held_out_model_falls_back_to_the_next_and_says_so():
    scores = {"A": {"attn": _values(1, 1), "cam": _values(0, 1)},
              "B": {"attn": _values(1, 1), "cam": _values(0, 1)},
              "C": {"cam": _values(1, 0)}}  # no class token: the attention method refuses
    folds = {f.held_out: f for f in leave_one_model_out(scores, keys=("pointing",))}
    assert folds["C"].chosen == "cam" and folds["C"].fallback and folds["C"].ranking[0][0] == "attn"
    assert folds["A"].chosen == "attn" and not folds["A"].fallback


# --- the grid pointing game -------------------------------------------------------------------------------------

def _pictures(classes=6, per_class=3, size=8):
    """Flat pictures whose value encodes (class, copy), so every cell's source can be read back."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    values = torch.arange(classes * per_class, dtype=torch.float32)
    return values.view(-1, 1, 1, 1).expand(-1, 3, size, size).clone(), labels


@pytest.mark.parametrize("grid", [2, 3])
def test_grid_builder_tiles_pictures_of_distinct_classes_into_their_cells(grid):
    images, labels = _pictures(classes=10, size=12)
    grids = make_pointing_grids(images, labels, n=7, grid=grid, seed=4)
    assert grids.images.shape == (7, 3, 12, 12) and grids.cell_targets.shape == (7, grid * grid)
    cell = 12 // grid
    for i in range(7):
        assert len(set(grids.cell_targets[i].tolist())) == grid * grid  # distinct classes
        for k in range(grid * grid):
            row, col = divmod(k, grid)
            source = int(grids.sources[i, k])
            assert int(labels[source]) == int(grids.cell_targets[i, k])
            block = grids.images[i, :, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
            # a flat picture shrinks to its own value (antialiased resampling: to rounding)
            torch.testing.assert_close(block, torch.full_like(block, float(source)), atol=1e-4, rtol=0)
    masks = grids.cell_masks()
    assert masks.shape == (grid * grid, 12, 12) and masks.sum(0).eq(1).all()
    assert masks[grid * grid - 1, -1, -1] and masks[0, 0, 0]


def test_grid_builder_refuses_what_cannot_make_a_grid():
    images, labels = _pictures(classes=3)
    with pytest.raises(ValueError, match="a 2x2 grid needs 4 distinct classes; the pictures have 3"):
        make_pointing_grids(images, labels, 2)
    images, labels = _pictures(classes=6, size=7)
    with pytest.raises(ValueError, match=r"sides \(7x7\) must divide by grid=2"):
        make_pointing_grids(images, labels, 2)
    with pytest.raises(ValueError, match="grid must be 2 or 3"):
        make_pointing_grids(images, labels, 2, grid=4)


def test_grid_scores_equal_a_literal_computation():
    """Each cell's class gets a map: class 0 peaks in its own cell with 3/4 of its mass there; class 1 peaks
    in another cell; class 2's map is flat zero; class 3 peaks in its cell with all its mass."""
    cells = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    for k in range(4):
        row, col = divmod(k, 2)
        cells[0, k, row * 2:(row + 1) * 2, col * 2:(col + 1) * 2] = True
    maps = {0: torch.tensor([[3.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]),
            1: torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [5, 0, 0, 0], [0, 0, 0, 1]]),
            2: torch.zeros(4, 4),
            3: torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]])}

    def explain(images, target):
        return torch.stack([maps[int(t)] for t in target])[:, None]

    scores = grid_scores(explain, torch.zeros(1, 3, 4, 4), torch.tensor([[0, 1, 2, 3]]), cells)
    # pointing: class 0 yes, class 1 no (peak in cell 2), class 2's flat map points at the top-left (cell 0): no,
    # class 3 yes -> 2 / 4; mass: 0.75, 0, 0 (no positive mass), 1 -> 1.75 / 4
    assert scores["grid_pointing"].tolist() == [0.5]
    assert scores["grid_mass"].tolist() == [pytest.approx(0.4375)]


class _CellReader(nn.Module):
    """Logits of the classes in the four cells (a picture value v is class v // 3; a single picture fills all
    four). A model that does not recognise grids sees every class of a grid shifted by one."""

    def __init__(self, recognises: bool) -> None:
        super().__init__()
        self.recognises = recognises
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        cells = x[:, 0, ::4, ::4].flatten(1)
        classes = (cells // 3).long()
        if not self.recognises:
            mixed = cells.amax(1) != cells.amin(1)
            classes[mixed] = (classes[mixed] + 1) % 6
        return torch.full((x.shape[0], 6), -10.0).scatter(1, classes, 10.0) * self.scale


def test_the_game_scores_only_grids_the_model_recognises_and_says_when_it_does_not(monkeypatch):
    images, labels = _pictures(classes=6, size=8)
    model = _CellReader(recognises=False)
    grids = build_pointing_grids(model, images, labels, n=12, confidence=0.9)
    assert grids.recognised(model).sum() == 0
    result = evaluate_grid_pointing(model, ["random"], grids, progress=False)
    assert not result.scored and result.recognised == 0 and result.grids == 12 and not result.values
    assert "recognises every cell's class (among its top 4) on only 0 of 12 grids" in result.reason
    model.recognises = True
    assert bool(grids.recognised(model).all())
    monkeypatch.setattr("captum_vit.methods.find_adapter", lambda *a, **k: _Grid2x2())
    result = evaluate_grid_pointing(model, ["random"], grids, progress=False)
    assert result.scored and result.recognised == 12 and result.chance == 0.25
    assert result.values["random"]["grid_pointing"].shape == (12,)


class _Grid2x2:
    def grid_for(self, size):
        return 2, 2


def test_pointing_grids_need_their_metric_data():
    from captum_vit.metrics import evaluate

    with pytest.raises(ValueError, match="reads pointing-game grids: build them with"):
        evaluate(lambda x: torch.zeros(x.shape[0], 3), {"m": lambda x, t: torch.zeros(x.shape[0], 1, 2, 2)},
                 [torch.zeros(2, 3, 4, 4)], ["grid_pointing"], progress=False)


def test_every_zoo_result_file_names_a_zoo_model():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo"
    for path in folder.glob("*.json"):
        assert json.loads(path.read_text())["model"] in EVIDENCE_MODELS


@pytest.mark.parametrize("command", [["benchmarks/zoo.py", "--tables", "--check"],
                                     ["benchmarks/train_evidence.py", "--card", "--check"]])
def test_the_evidence_page_and_the_model_card_are_what_the_files_give(command):
    """docs/evidence.md's generated block from benchmarks/results/zoo, MODEL_CARD.md from the weights' metadata."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, *command], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

"""Metrics on hand-made cases with known answers, and Captum interop."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from captum.metrics import infidelity, sensitivity_max
from conftest import make_model
from torch import nn

from captum_vit import AttentionGuidedGradCAM, LayerReciproCAM
from captum_vit.metrics import (
    adcc,
    adcc_score,
    box_localization,
    deletion_insertion,
    evaluate_adcc,
    expand_to_input,
    input_attribution,
    make_mosaic,
    mosaic_cell_boxes,
    patch_perturbation,
    pointing_game,
)


def test_adcc_aggregate_matches_the_paper_arithmetic():
    # Table 1 of ViT-ReciproCAM: Drop 25.82, Coher 88.61, Compl 46.35 -> ADCC 69.11. The exact harmonic
    # mean of the rounded components is 69.116; the inputs' rounding (+-0.005) allows +-0.01.
    value = adcc_score(torch.tensor(0.2582), torch.tensor(0.8861), torch.tensor(0.4635))
    assert 100 * value.item() == pytest.approx(69.11, abs=0.01)
    assert 100 * value.item() != pytest.approx(69.11 + 0.05, abs=0.01)


class RegionModel(nn.Module):
    """Class 0's logit is the mean of the pixels in the top-left 4x4 corner."""

    def forward(self, x):
        evidence = 8 * x[:, :, :4, :4].mean(dim=(1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def region_map(x, target):
    m = torch.zeros(x.shape[0], 1, 8, 8)
    m[:, :, :4, :4] = 1
    return m


def constant_map(value):
    return lambda x, t: torch.full((x.shape[0], 1, 4, 4), value)


IMAGES = torch.ones(3, 3, 8, 8)


def test_perfect_map():
    r = adcc(RegionModel(), region_map, IMAGES, target=0)
    assert torch.all(r.average_drop == 0) and torch.all(r.average_increase == 0)
    torch.testing.assert_close(r.coherency, torch.ones(3))
    torch.testing.assert_close(r.complexity, torch.full((3,), 0.25))
    expected = 3 / (1 + 1 / 0.75 + 1)
    torch.testing.assert_close(r.adcc, torch.full((3,), expected))
    s = r.summary()
    assert s["adcc_of_means"] == pytest.approx(100 * expected) and s["mean_adcc"] == pytest.approx(100 * expected)


def test_all_ones_map():
    with pytest.warns(UserWarning, match="constant map"):
        r = adcc(RegionModel(), constant_map(1.0), IMAGES, target=0)
    assert torch.all(r.average_drop == 0) and torch.all(r.complexity == 1)
    assert torch.all(r.coherency == 0) and torch.all(r.adcc == 0) and r.constant_map.all()


def test_constant_map_never_nan():
    with pytest.warns(UserWarning, match="coherency is undefined"):
        r = adcc(RegionModel(), constant_map(0.5), IMAGES, target=0)
    for value in (r.average_drop, r.coherency, r.complexity, r.adcc):
        assert torch.isfinite(value).all()
    torch.testing.assert_close(r.complexity, torch.full((3,), 0.5))
    y = torch.sigmoid(torch.tensor(8.0))  # p_0 of the image; the explanation input halves the evidence
    o = torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(r.average_drop, torch.full((3,), ((y - o) / y).item()))
    assert math.isfinite(r.summary()["adcc_of_means"])


def test_map_off_the_evidence_drops_everything():
    def wrong(x, t):
        m = torch.zeros(x.shape[0], 1, 8, 8)
        m[:, :, 4:, 4:] = 1
        return m

    r = adcc(RegionModel(), wrong, IMAGES, target=0)
    y = torch.sigmoid(torch.tensor(8.0))
    torch.testing.assert_close(r.average_drop, torch.full((3,), ((y - 0.5) / y).item()))


def test_adcc_batches_and_real_explainer():
    model, images = make_model("vit_reg4")
    cam = LayerReciproCAM(model, model.blocks[-1])
    whole = adcc(model, cam, images, target=[1, 2])
    chunked = adcc(model, lambda x, t: cam.attribute(x, target=t), images, target=[1, 2], batch_size=1)
    torch.testing.assert_close(whole.adcc, chunked.adcc)
    assert ((whole.adcc >= 0) & (whole.adcc <= 1)).all()


def test_pointing_game_cells():
    mosaics = torch.zeros(2, 3, 8, 8)
    targets = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])

    def inside_cell(x, t):  # class c lights up cell c % 4 only (on a 4x4 grid)
        maps = torch.zeros(x.shape[0], 1, 4, 4)
        for i, c in enumerate(t.tolist()):
            r, col = divmod(c % 4, 2)
            maps[i, 0, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2] = 1
        return maps

    torch.testing.assert_close(pointing_game(inside_cell, mosaics, targets), torch.ones(2, 4))
    uniform = pointing_game(constant_map(0.7), mosaics, targets, batch_size=1)
    torch.testing.assert_close(uniform, torch.full((2, 4), 0.25))
    odd_grid = pointing_game(lambda x, t: torch.full((x.shape[0], 1, 5, 5), 0.3), mosaics, targets)
    torch.testing.assert_close(odd_grid, torch.full((2, 4), 0.25))  # upsampled to the mosaic
    with pytest.raises(ValueError, match=r"one map per example"):
        pointing_game(lambda x, t: torch.ones(x.shape[0], 3, 4, 4), mosaics, targets)
    zero = pointing_game(constant_map(0.0), mosaics, targets)
    assert torch.all(zero == 0)


def test_make_mosaic_layout():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    mosaic = make_mosaic(images)
    assert mosaic.shape == (3, 4, 4)
    for cell, (x0, y0, x1, y1) in enumerate(mosaic_cell_boxes(4, 4)):
        assert torch.all(mosaic[:, y0:y1, x0:x1] == cell)
    with pytest.raises(ValueError, match="four images"):
        make_mosaic(images[:3])


def test_box_localization_known_cases():
    maps = torch.zeros(3, 1, 10, 10)
    maps[0, 0, 2:6, 2:6] = 1  # exactly the box
    maps[1, 0, 0:2, 0:2] = 1  # two blobs: the union of their boxes counts
    maps[1, 0, 8:10, 8:10] = 1
    maps[2, 0, 2:6, 4:8] = 1  # half overlap
    maps[2, 0, 2:6, 2:4] = 0.5  # exactly 0.5: not above the strict threshold
    gt = [[(2, 2, 6, 6)], [(0, 0, 2, 2), (8, 8, 10, 10)], [(2, 2, 6, 6)]]
    out = box_localization(maps, gt)
    torch.testing.assert_close(out["iou"], torch.tensor([1.0, 1.0, 8 / 24]))
    torch.testing.assert_close(out["dice"], torch.tensor([1.0, 1.0, 16 / 32]))
    torch.testing.assert_close(out["pixel_accuracy"], torch.tensor([1.0, 1.0, 84 / 100]))
    only_correct = box_localization(maps, gt, correct=torch.tensor([True, False, True]))
    assert only_correct["mean"]["iou"] == pytest.approx((1 + 8 / 24) / 2)
    diagonal = torch.zeros(1, 1, 6, 6)
    diagonal[0, 0, [1, 2, 3], [1, 2, 3]] = 1  # 8-connected: one region, one box
    assert box_localization(diagonal, [[(1, 1, 4, 4)]])["iou"][0] == 1


def test_deletion_insertion_exact_on_a_linear_model():
    class Sum(nn.Module):
        def forward(self, x):
            s = x.flatten(1).sum(1)
            return torch.stack([s, torch.zeros_like(s)], 1)

    x = torch.ones(1, 1, 2, 2)
    ranking = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    deletion, insertion = deletion_insertion(Sum(), x, ranking, torch.tensor([0]), steps=4)
    p = torch.sigmoid(torch.arange(5.0))  # p(k pixels present)
    torch.testing.assert_close(deletion, torch.trapezoid(p.flip(0), dx=0.25)[None])
    torch.testing.assert_close(insertion, torch.trapezoid(p, dx=0.25)[None])


def test_deletion_prefers_the_right_map():
    model = RegionModel()
    images = torch.rand(4, 3, 8, 8) + 0.5
    good = region_map(images, None)
    bad = 1 - good
    target = torch.zeros(4, dtype=torch.long)
    d_good, i_good = deletion_insertion(model, images, good, target, steps=8, batch_size=7)
    d_bad, i_bad = deletion_insertion(model, images, bad, target, steps=8)
    assert (d_good < d_bad).all() and (i_good > i_bad).all()


def test_captum_infidelity_and_sensitivity_one_liners():
    model, images = make_model("vit_reg4")
    cam = LayerReciproCAM(model, model.blocks[-1])
    target = torch.tensor([1, 2])
    maps = cam.attribute(images, target=target)
    attributions = expand_to_input(maps, images)
    assert attributions.shape == images.shape
    perturb = patch_perturbation(16, generator=torch.Generator().manual_seed(0))
    noise, perturbed = perturb(images)
    assert torch.all(noise[:, :, :16, :16] == noise[:, :, :1, :1])  # constant on a patch
    infid = infidelity(model, perturb, images, attributions, target=target, n_perturb_samples=4)
    assert infid.shape == (2,) and torch.isfinite(infid).all()
    for fn in (cam.attribute, input_attribution(cam), input_attribution(AttentionGuidedGradCAM(model))):
        sens = sensitivity_max(fn, images, target=target, n_perturb_samples=2)
        assert sens.shape == (2,) and torch.isfinite(sens).all()


def test_evaluate_adcc_resumes(tmp_path):
    model, images = make_model("vit_reg4")
    images = torch.cat([images, images.flip(0), images * 0.5])
    loader = [(images[i : i + 2], torch.tensor([1, 2])) for i in range(0, 6, 2)]
    calls = []

    def explain(x, t):
        calls.append(x.shape[0])
        return LayerReciproCAM(model, model.blocks[-1]).attribute(x, target=t)

    first = evaluate_adcc(model, explain, loader, use_labels=True, checkpoint_dir=tmp_path, progress=False)
    assert len(first) == 6 and len(calls) == 6  # two explainer calls per batch
    (tmp_path / "batch_00001.pt").unlink()  # as if interrupted before batch 1 was written
    calls.clear()
    again = evaluate_adcc(model, explain, loader, use_labels=True, checkpoint_dir=tmp_path, progress=False)
    assert len(calls) == 2
    torch.testing.assert_close(again.adcc, first.adcc)
    no_labels = evaluate_adcc(model, explain, [b[0] for b in loader], progress=False)
    assert len(no_labels) == 6


def _checkpoint_run(model, loader, directory, method="reciprocam", **kw):
    from captum_vit.methods import explainer

    return evaluate_adcc(model, explainer(method, model), loader, use_labels=True, checkpoint_dir=directory,
                         progress=False, **kw)


def test_a_checkpoint_directory_refuses_another_run(tmp_path):
    from captum_vit.metrics import CheckpointMismatchError

    model, images = make_model("vit_reg4")
    images = torch.cat([images, images.flip(0)])
    labels = torch.tensor([1, 2, 3, 4])
    by_two = [(images[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    _checkpoint_run(model, by_two, tmp_path)
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"method": "reciprocam block=-3' in manifest and '"batch_size": 2' in manifest
    with pytest.raises(CheckpointMismatchError, match="method is \"reciprocam block=-3 .*\" there but 'agcam .*' now"):
        _checkpoint_run(model, by_two, tmp_path, method="agcam")
    with pytest.raises(CheckpointMismatchError, match="num_batches is 2 there but 1 now"):
        _checkpoint_run(model, [(images, labels)], tmp_path)
    from torch.utils.data import DataLoader, TensorDataset

    with pytest.raises(CheckpointMismatchError, match="batch_size is 2 there but 4 now"):
        _checkpoint_run(model, DataLoader(TensorDataset(images, labels), batch_size=4), tmp_path)
    with pytest.raises(CheckpointMismatchError, match="baseline is 0.0 there but 0.5 now"):
        _checkpoint_run(model, by_two, tmp_path, baseline=0.5)
    other_weights, _ = make_model("vit_reg4", seed=5)
    with pytest.raises(CheckpointMismatchError, match="model is 'VisionTransformer [0-9a-f]+' there but"):
        _checkpoint_run(other_weights, by_two, tmp_path)
    reordered = [(images[i : i + 2], labels[i : i + 2]) for i in (2, 0)]
    with pytest.raises(CheckpointMismatchError, match="batch_00000.pt was computed on other inputs"):
        _checkpoint_run(model, reordered, tmp_path)
    # an explicit restart starts over, and then the new run's files are reused
    restarted = _checkpoint_run(model, [(images, labels)], tmp_path, method="agcam", restart=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_00000.pt", "manifest.json"]
    again = _checkpoint_run(model, [(images, labels)], tmp_path, method="agcam")
    assert torch.equal(again.adcc, restarted.adcc)


def test_a_damaged_checkpoint_file_is_named_and_recomputed(tmp_path):
    model, images = make_model("vit_reg4")
    loader = [(images, torch.tensor([1, 2])), (images.flip(0), torch.tensor([3, 4]))]
    first = _checkpoint_run(model, loader, tmp_path)
    damaged = tmp_path / "batch_00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="batch_00001.pt is damaged"):
        again = _checkpoint_run(model, loader, tmp_path)
    assert torch.equal(again.adcc, first.adcc)
    (tmp_path / "batch_00000.pt").write_bytes(b"")  # empty
    with pytest.warns(UserWarning, match="batch_00000.pt is damaged"):
        assert torch.equal(_checkpoint_run(model, loader, tmp_path).adcc, first.adcc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both files are whole again
        assert torch.equal(_checkpoint_run(model, loader, tmp_path).adcc, first.adcc)


def test_checkpoint_files_without_a_manifest_and_a_file_as_directory_are_refused(tmp_path):
    from captum_vit.metrics import CheckpointMismatchError

    model, images = make_model("vit_reg4")
    loader = [(images, torch.tensor([1, 2]))]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "batch_00000.pt").write_bytes(b"x")
    with pytest.raises(CheckpointMismatchError, match="without manifest.json"):
        _checkpoint_run(model, loader, tmp_path / "old")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        _checkpoint_run(model, loader, tmp_path / "file")


def _nan_map(x, t):
    m = torch.rand(x.shape[0], 1, 4, 4)
    m[0, 0, 1, 1] = float("nan")
    return m


def _one_map_short(x, t):
    return torch.rand(x.shape[0] - 1, 1, 4, 4)


_MAPS = torch.rand(3, 1, 4, 4)
_BOXES = [[(0, 0, 4, 4)]] * 3


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, 0, steps=0), ValueError, "steps must be a positive integer"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, 0, steps=2.5), ValueError, "steps must be a positive integer"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, 7), ValueError, "target 7 is out of range"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, [0, 1]), ValueError, "target has 2 entries but inputs hold 3"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS[:2], 0), ValueError, "2 maps for 3 images"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, 0, baseline=float("nan")), ValueError, "baseline must be"),
        (lambda m: deletion_insertion(m, IMAGES, _nan_map(IMAGES, 0), 0), ValueError, r"image\(s\) \[0\] hold NaN"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, torch.zeros(3, 0, dtype=torch.long)), ValueError,
         "needs at least one class"),
        (lambda m: deletion_insertion(m, IMAGES, _MAPS, 2**70), ValueError, "is out of range"),
        (lambda m: expand_to_input(_MAPS[:2], IMAGES), ValueError, "2 maps for 3 images"),
        (lambda m: adcc(m, _one_map_short, IMAGES, target=0), ValueError, "adcc: 2 maps for 3 images"),
        (lambda m: adcc(m, _nan_map, IMAGES, target=0), ValueError, "hold NaN or infinite values"),
        (lambda m: adcc(m, region_map, IMAGES, target=0, baseline="zero"), ValueError, "baseline must be"),
        (lambda m: pointing_game(region_map, IMAGES, [[0, 1, 0]] * 3), ValueError, r"must be \(N, 4\)"),
        (lambda m: pointing_game(region_map, IMAGES, torch.zeros(3, 4)), TypeError, "integer class indices"),
        (lambda m: box_localization(_MAPS, _BOXES[:2]), ValueError, "2 .*|3 maps for 2 images"),
        (lambda m: box_localization(_MAPS, _BOXES, threshold=1.5), ValueError, r"must lie in \[0, 1\)"),
        (lambda m: box_localization(_MAPS, _BOXES, correct=torch.ones(2)), ValueError, r"correct must be \(3,\)"),
        (lambda m: box_localization(_nan_map(IMAGES, 0), _BOXES), ValueError, "hold NaN"),
    ],
)
def test_metrics_refuse_bad_input_in_one_line(call, error, message):
    with pytest.raises(error, match=message) as info:
        call(RegionModel())
    assert len(str(info.value).splitlines()) == 1


def test_metrics_accept_every_target_form_and_say_why_a_mean_is_nan():
    model = RegionModel()
    reference = deletion_insertion(model, IMAGES, _MAPS, torch.zeros(3, dtype=torch.long), steps=4)
    for target in (0, [0, 0, 0], None):  # None: the predicted class, 0 for these images
        for got, want in zip(deletion_insertion(model, IMAGES, _MAPS, target, steps=4), reference):
            assert torch.equal(got, want)
    scores = pointing_game(region_map, IMAGES, [[0, 1, 0, 1]] * 3)
    assert torch.equal(scores, pointing_game(region_map, IMAGES, torch.tensor([[0, 1, 0, 1]] * 3)))
    with pytest.warns(UserWarning, match="no image is marked correct"):
        result = box_localization(_MAPS, _BOXES, correct=torch.zeros(3, dtype=torch.bool))
    assert math.isnan(result["mean"]["iou"]) and torch.isfinite(result["iou"]).all()
    from captum_vit.metrics import ADCCResult

    empty = ADCCResult(*[torch.zeros(0)] * 6)
    with pytest.raises(ValueError, match="holds no examples"):
        empty.summary()


def test_quantus_explain_func_follows_quantus_contract():
    from captum_vit.metrics import quantus_explain_func

    model, images = make_model("vit_reg4")
    cam = LayerReciproCAM(model, model.blocks[-1])
    explain_func = quantus_explain_func(cam)
    x, y = images.numpy(), torch.tensor([1, 2]).numpy()
    a = explain_func(model, x, y)  # as Quantus calls it
    assert isinstance(a, type(x)) and a.shape == (2, 1, 64, 64) and a.dtype.name == "float32"
    expected = torch.nn.functional.interpolate(cam.attribute(images, target=[1, 2]), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(torch.from_numpy(a), expected)
    with pytest.raises(ValueError, match="needs \\(N, C, H, W\\) inputs"):
        explain_func(model, x[0], y[:1])


def test_quantus_metrics_run_on_the_embedded_model_and_agree_with_our_pointing():
    """Quantus 0.6 (in the test extra) scores our maps through quantus_explain_func."""
    quantus = pytest.importorskip("quantus")
    from captum_vit.metrics import mosaic_cell_boxes, quantus_explain_func
    from captum_vit.models import default_model, sample_images

    loaded = default_model()
    model = loaded.forward
    pictures, labels = sample_images()
    images = torch.cat([loaded.preprocess(p) for p in pictures[:4]])
    mosaics = make_mosaic(images)[None].repeat(4, 1, 1, 1)  # one mosaic, each cell's class explained in turn
    cells = torch.tensor(labels[:4])
    explain_func = quantus_explain_func(AttentionGuidedGradCAM(model))
    x, y = mosaics.numpy(), cells.numpy()
    masks = torch.zeros(4, 1, 64, 64)
    for c, (x0, y0, x1, y1) in enumerate(mosaic_cell_boxes(64, 64)):
        masks[c, :, y0:y1, x0:x1] = 1
    hits = quantus.PointingGame(disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, s_batch=masks.numpy(), explain_func=explain_func, device="cpu")
    # ours: does the map's maximum (upsampled as Quantus sees it) fall inside the class's cell?
    maps = torch.from_numpy(explain_func(model, x, y))
    ours = [bool(masks[c, 0].flatten()[maps[c, 0].flatten().argmax()]) for c in range(4)]
    assert [bool(h) for h in hits] == ours
    random_logit = quantus.RandomLogit(num_classes=10, disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, explain_func=explain_func, device="cpu")
    assert len(random_logit) == 4 and all(math.isfinite(v) for v in random_logit)


def test_figure_captions_say_what_is_shown_and_never_call_a_scaled_map_raw():
    from captum_vit.visualization import range_caption

    assert range_caption(torch.tensor([[0.0, 0.5], [1.0, 0.25]])) == (
        "scaled 0 .. 1 before drawing\n(normalize=False maps give the raw range)")
    assert range_caption(torch.tensor([[0.9291, 0.9306]])) == "shown scaled; values 0.929 .. 0.931"
    flat = range_caption(torch.tensor([[0.92910, 0.92911]]))
    assert flat.startswith("shown scaled; values") and flat.endswith("FLAT: differences are noise")

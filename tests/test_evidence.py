"""Known-evidence canvases: the label is decided by the marks, whose boxes are exact."""

from __future__ import annotations

import pytest
import torch

from captum_vit.evidence import CLASSES, MARK, MARK_COLOURS, denormalize, make_canvases

BACKGROUNDS = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant, decisive, distractors", [("single", 1, 0), ("pair", 2, 0), ("distractor", 1, 1)])
def test_marks_decide_the_labels_and_sit_in_their_boxes(variant, decisive, distractors):
    batch = make_canvases(BACKGROUNDS, variant, 40, seed=3)
    assert batch.images.shape == (40, 3, 64, 64) and batch.labels.shape == (40, len(CLASSES))
    pixels = denormalize(batch.images)
    for i in range(40):
        assert len(batch.boxes[i]) == decisive and len(batch.distractors[i]) == distractors
        assert sorted(c for c, _ in batch.boxes[i]) == batch.labels[i].nonzero()[:, 0].tolist()
        for c, (x0, y0, x1, y1) in batch.boxes[i]:
            assert x1 - x0 == MARK and y1 - y0 == MARK and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            inner = pixels[i, :, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
            torch.testing.assert_close(inner, torch.tensor(MARK_COLOURS[c][1]).view(3, 1, 1).expand_as(inner))
            assert pixels[i, :, y0, x0:x1].abs().max() == 0  # the black border
        for c, (x0, y0, x1, y1) in batch.distractors[i]:
            assert c not in [d for d, _ in batch.boxes[i]]  # another colour than the decisive mark
            ring = pixels[i, :, y0, x0:x1]
            torch.testing.assert_close(ring, torch.tensor(MARK_COLOURS[c][1]).view(3, 1).expand_as(ring))
    masks = batch.box_masks()
    assert masks.shape == (40, len(CLASSES), 64, 64)
    assert (masks.flatten(2).sum(2) == batch.labels * MARK * MARK).all()


def test_canvases_are_reproducible_and_differ_across_seeds():
    a, b = make_canvases(BACKGROUNDS, "pair", 8, seed=5), make_canvases(BACKGROUNDS, "pair", 8, seed=5)
    assert torch.equal(a.images, b.images) and a.boxes == b.boxes
    assert not torch.equal(a.images, make_canvases(BACKGROUNDS, "pair", 8, seed=6).images)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="variant must be one of single, pair, distractor"):
        make_canvases(BACKGROUNDS, "triple", 2)
    with pytest.raises(ValueError, match=r"backgrounds must be \(M, 3, h, w\)"):
        make_canvases(BACKGROUNDS[:, 0], "single", 2)


# --- scores where the evidence is known -------------------------------------------------------------------

def test_evidence_mass_is_the_positive_share_inside_the_mask():
    from captum_vit.metrics import evidence_mass

    maps = torch.tensor([[[3.0, 1.0], [-5.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])[:, None]
    masks = torch.tensor([[[True, False], [True, False]], [[True, True], [True, True]], [[False, False], [False, True]]])
    # image 0: positive mass 4, of which 3 inside (the -5 counts as zero); image 1: no positive mass; image 2: even
    assert evidence_mass(maps, masks).tolist() == [0.75, 0.0, 0.25]
    with pytest.raises(ValueError, match=r"masks must be a \(N, H, W\) bool tensor with one mask per map \(N=3\)"):
        evidence_mass(maps, masks[:2])


def test_top_pixel_inside_reads_the_maximum_after_upsampling():
    from captum_vit.metrics import top_pixel_inside

    maps = torch.zeros(2, 1, 2, 2)
    maps[0, 0, 1, 1] = 1.0  # bottom-right cell
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 4:, 4:] = True
    # image 1 is constant: its maximum is the first pixel, top-left, outside the mask
    assert top_pixel_inside(maps, mask).tolist() == [1.0, 0.0]


def test_rank_correlation_is_spearman_with_ties_and_zero_for_a_constant_map():
    from scipy.stats import spearmanr

    from captum_vit.metrics import rank_correlation

    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    b[1] = a[1].round(decimals=1)  # ties
    got = rank_correlation(a, b)
    for i in range(3):
        assert got[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-12)
    assert rank_correlation(a, -a).tolist() == pytest.approx([-1.0] * 3)
    assert rank_correlation(a, torch.ones_like(a)).tolist() == [0.0] * 3
    with pytest.raises(ValueError, match="maps of one shape"):
        rank_correlation(a, torch.rand(3, 1, 8, 8))


def test_bootstrap_interval_brackets_the_mean_and_refuses_undefined_values():
    from captum_vit.metrics import bootstrap_interval

    values = torch.tensor([0.0] * 30 + [1.0] * 70)
    s = bootstrap_interval(values)
    assert s["mean"] == pytest.approx(0.7) and s["n"] == 100
    assert 0.58 < s["lo"] < 0.7 < s["hi"] < 0.8  # binomial: 0.7 +- 1.96 * 0.046
    assert bootstrap_interval(torch.full((5,), 0.25)) == {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n": 5}
    with pytest.raises(ValueError, match="NaN or infinity"):
        bootstrap_interval(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval(torch.tensor([]))


def _tiny_canvas_vit(**kwargs):
    from conftest import randomize
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return randomize(VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0,
                                       num_classes=len(CLASSES), **kwargs))


def test_cascading_randomization_goes_from_the_head_down_and_leaves_the_model_alone():
    from captum_vit.metrics import cascading_randomization

    model = _tiny_canvas_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = dict(before)
    seen = []
    for stage, randomised in cascading_randomization(model, seed=3):
        now = randomised.state_dict()
        changed = sorted({k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
                          for k in now if not torch.equal(now[k], trained[k])})
        seen.append((stage, changed))
        trained = {k: v.clone() for k, v in now.items()}
        assert torch.equal(now["cls_token"], before["cls_token"]) and torch.equal(now["pos_embed"], before["pos_embed"])
    assert seen == [("head", ["head", "norm"]), ("block 1", ["blocks.1"]), ("block 0", ["blocks.0"]),
                    ("patch embedding", ["patch_embed"])]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model itself untouched
    first = [r.state_dict()["blocks.0.attn.qkv.weight"].clone() for _, r in cascading_randomization(model, seed=3)]
    again = [r.state_dict()["blocks.0.attn.qkv.weight"].clone() for _, r in cascading_randomization(model, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded


def test_known_evidence_evaluation_scores_every_metric_and_does_not_depend_on_batching():
    from captum_vit.metrics import KNOWN_EVIDENCE_METRICS, evaluate_known_evidence

    model = _tiny_canvas_vit()
    methods = ["reciprocam-authors", "rollout", "random"]  # the default's block -3: deeper than this model
    a = evaluate_known_evidence(model, methods, BACKGROUNDS, n=4, batch_size=2, progress=False)
    b = evaluate_known_evidence(model, methods, BACKGROUNDS, n=4, batch_size=4, progress=False)
    assert a.stages == ["head", "block 1", "block 0", "patch embedding"]
    expected = list(KNOWN_EVIDENCE_METRICS) + [f"spearman/{s}" for s in a.stages]
    assert list(a.values) == methods and all(list(a.values[m]) == expected for m in methods)
    for m in methods:
        for k, v in a.values[m].items():
            assert v.shape == (4,) and torch.isfinite(v).all(), (m, k)
    for m in ("reciprocam-authors", "rollout"):  # deterministic methods: the batch is only a unit of work
        for k in expected:
            torch.testing.assert_close(a.values[m][k], b.values[m][k], rtol=1e-5, atol=1e-5)
    # rollout reads attention only, so a new head leaves its map exactly as it was
    assert a.values["rollout"]["spearman/head"].tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    summary = a.summary()
    assert set(summary["random"]["pointing"]) == {"mean", "lo", "hi", "n"} and summary["random"]["pointing"]["n"] == 4
    assert set(a.accuracy) == {"single", "pair", "distractor"}


def test_known_evidence_evaluation_reports_a_method_the_model_does_not_support():
    from timm.models.deit import VisionTransformerDistilled

    from captum_vit.metrics import evaluate_known_evidence

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=64, patch_size=8, embed_dim=48, depth=1, num_heads=2,
                                       num_classes=len(CLASSES)).eval()
    result = evaluate_known_evidence(model, ["relevance", "rollout"], BACKGROUNDS, n=2, randomization=False,
                                     progress=False)
    assert list(result.values) == ["rollout"] and "distillation" in result.unsupported["relevance"]
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_known_evidence(model, ["gradcam++"], BACKGROUNDS, n=2)


def test_committed_known_evidence_models_read_the_marks():
    """Each committed marks model classifies canvases on the bundled pictures (not its training backgrounds)."""
    import numpy as np

    from captum_vit.evidence import EVIDENCE_MODELS, load_evidence_model
    from captum_vit.models import sample_images

    pictures, _ = sample_images()
    backgrounds = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pictures]))
    batch = make_canvases(backgrounds.permute(0, 3, 1, 2), "single", 64, seed=1)
    truth = batch.labels.argmax(1)
    for name in [name for name, spec in EVIDENCE_MODELS.items() if spec.task == "marks"]:
        with torch.no_grad():
            accuracy = (load_evidence_model(name)(batch.images).argmax(1) == truth).float().mean().item()
        assert accuracy >= 0.95, f"{name}: {accuracy:.3f}"


def test_known_evidence_evaluation_resumes_from_its_checkpoints_and_refuses_another_runs(tmp_path):
    from captum_vit.metrics import CheckpointMismatchError, evaluate_known_evidence

    model = _tiny_canvas_vit()
    first = evaluate_known_evidence(model, ["rollout"], BACKGROUNDS, n=4, batch_size=2, progress=False,
                                    checkpoint_dir=tmp_path)
    files = sorted((tmp_path / "rollout").iterdir())
    assert [p.name for p in files] == ["batch_00000.pt", "batch_00001.pt", "manifest.json"]
    written = {p.name: p.stat().st_ino for p in files}  # a recomputed batch is written anew: another file
    again = evaluate_known_evidence(model, ["rollout"], BACKGROUNDS, n=4, batch_size=2, progress=False,
                                    checkpoint_dir=tmp_path)
    assert {p.name: p.stat().st_ino for p in (tmp_path / "rollout").iterdir()} == written, "a batch was recomputed"
    assert all(torch.equal(v, first.values["rollout"][k]) for k, v in again.values["rollout"].items())
    with pytest.raises(CheckpointMismatchError, match="n is 4 there but 6 now"):
        evaluate_known_evidence(model, ["rollout"], BACKGROUNDS, n=6, batch_size=2, progress=False,
                                checkpoint_dir=tmp_path)

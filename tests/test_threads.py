"""Explanations beside a live model: other threads' forwards are untouched, and
explanations of one model in several threads equal the sequential results."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_same_state, make_model, model_state
from torch import nn

from captum_vit import AttentionGuidedGradCAM, AttentionRollout, AttnLRP, GradientRollout, LayerReciproCAM, LeGrad
from captum_vit.baselines import vit_layer_gradcam


class PausingForward(nn.Module):
    """Runs the model, but first lets a serving thread run a plain forward while the explanation's hooks are on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.pauses = 0

    def forward(self, x):
        self.resume.clear()
        self.paused.set()
        assert self.resume.wait(60), "the serving thread never answered"
        self.pauses += 1
        return self.model(x)


def _explainers(wrapped: nn.Module, model: nn.Module):
    block = model.blocks[-1]
    return {
        "reciprocam-fast": lambda x: LayerReciproCAM(wrapped, block, vit=model).attribute(x, target=[1, 2], path="fast"),
        "reciprocam-general": lambda x: LayerReciproCAM(wrapped, block, vit=model).attribute(
            x, target=[1, 2], path="general", batch_size=7
        ),
        "agcam": lambda x: AttentionGuidedGradCAM(wrapped, vit=model).attribute(x, target=[1, 2]),
        "rollout": lambda x: AttentionRollout(wrapped, vit=model).attribute(x),
        "grad-rollout": lambda x: GradientRollout(wrapped, vit=model).attribute(x, target=[1, 2]),
        "layergradcam": lambda x: vit_layer_gradcam(wrapped, vit=model).attribute(x, target=[1, 2]),
        "attnlrp": lambda x: AttnLRP(wrapped, vit=model).attribute(x, target=[1, 2]),
        "legrad": lambda x: LeGrad(wrapped, vit=model).attribute(x, target=[1, 2]),
    }


@pytest.mark.parametrize(
    "method", ["reciprocam-fast", "reciprocam-general", "agcam", "rollout", "grad-rollout", "layergradcam", "attnlrp",
               "legrad"]
)
def test_a_forward_in_another_thread_during_an_explanation_is_untouched(method):
    model, images = make_model("deit_tiny")
    served = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected_logits = model(served)
    expected_maps = _explainers(model, model)[method](images)
    before = model_state(model)

    wrapped = PausingForward(model)
    finished = threading.Event()
    served_logits, errors = [], []

    def serve():  # a plain forward every time the explanation pauses inside forward_func
        while not finished.is_set():
            if wrapped.paused.wait(0.05):
                wrapped.paused.clear()
                try:
                    with torch.no_grad():
                        served_logits.append(model(served))
                except Exception as err:  # noqa: BLE001 - reported by the main thread
                    errors.append(err)
                wrapped.resume.set()

    server = threading.Thread(target=serve)
    server.start()
    try:
        maps = _explainers(wrapped, model)[method](images)
    finally:
        finished.set()
        server.join(60)
    assert not errors, errors
    assert wrapped.pauses >= 1 and len(served_logits) + len(errors) == wrapped.pauses
    for logits in served_logits:
        assert torch.equal(logits, expected_logits)
    torch.testing.assert_close(maps, expected_maps, atol=1e-6, rtol=1e-6)
    assert_same_state(before, model_state(model))


def test_explanations_of_one_model_in_several_threads_equal_the_sequential_ones():
    model, _ = make_model("deit_tiny")
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(2, 3, 112, 112, generator=g) for _ in range(6)]
    cam = LayerReciproCAM(model, model.blocks[-1])
    agcam = AttentionGuidedGradCAM(model)
    jobs = [
        (lambda x: cam.attribute(x, target=[3, 4], path="fast")),
        (lambda x: LayerReciproCAM(model, model.blocks[1]).attribute(x, batch_size=5)),
        (lambda x: agcam.attribute(x, target=[3, 4])),
        (lambda x: GradientRollout(model).attribute(x)),
        (lambda x: AttnLRP(model).attribute(x, target=[3, 4])),
        (lambda x: LeGrad(model).attribute(x, target=[3, 4])),
    ]
    expected = [job(x) for job, x in zip(jobs, batches)]
    before = model_state(model)

    for _ in range(3):
        results, errors = [None] * len(jobs), []
        start = threading.Barrier(len(jobs) + 1)

        def run(i):
            try:
                start.wait(30)
                results[i] = jobs[i](batches[i])
            except Exception as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        start.wait(30)
        with torch.no_grad():  # and a plain forward meanwhile
            served = model(batches[0])
        for t in threads:
            t.join(120)
        assert not errors, errors
        for got, want in zip(results, expected):
            assert torch.equal(got, want)
        with torch.no_grad():
            assert torch.equal(served, model(batches[0]))
    assert_same_state(before, model_state(model))

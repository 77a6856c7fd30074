"""ExplainedViT: logits and ReciproCAM maps in one hook-free forward that exports.

Maps must equal LayerReciproCAM's eager maps: exactly in eager, to 1e-4 through
torch.export and ONNX (onnxruntime), for DeiT, distilled DeiT and a register-token ViT."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, make_model, model_state

from captum_vit import LayerReciproCAM, UnsupportedModelError
from captum_vit.export import ExplainedViT

FAMILIES = ["deit_tiny", "deit_tiny_distilled", "vit_reg4"]
TOL = dict(atol=1e-4, rtol=1e-4)


def _reference(model, images, **kw):
    """Raw scores of the general path: exactness is defined on them (min-max scaling of a nearly flat map, as
    the unmasked residual gives at the last block of a random model, magnifies rounding)."""
    kw.setdefault("normalize", False)
    return LayerReciproCAM(model, model.blocks[-1]).attribute(images, path="general", **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_eager_maps_equal_layer_reciprocam(name):
    model, images = make_model(name)
    before = model_state(model)
    explained = ExplainedViT(model, image_size=tuple(images.shape[-2:]), normalize=False)
    logits, maps = explained(images)
    torch.testing.assert_close(logits, model(images), **TOL)
    torch.testing.assert_close(maps, _reference(model, images), **TOL)
    target = torch.tensor([4, 9])
    torch.testing.assert_close(explained(images, target)[1], _reference(model, images, target=target), **TOL)
    # the two parts a runtime may compute in different precisions compose to the whole
    block_input = explained.trunk(images)
    assert block_input.shape[0] == 2 and block_input.dim() == 3
    split_logits, split_maps = explained.from_block_input(block_input)
    torch.testing.assert_close(split_logits, logits, **TOL)
    torch.testing.assert_close(split_maps, maps, **TOL)
    every = ExplainedViT(model, image_size=tuple(images.shape[-2:]), targets="all", normalize=False,
                         residual="input", scores="logits", kernel="dirac")(images)[1]
    reference = LayerReciproCAM(model, model.blocks[-1]).attribute_all_classes(
        images, normalize=False, residual="input", scores="logits", kernel="dirac", path="general")
    torch.testing.assert_close(every, reference, **TOL)
    scaled = ExplainedViT(model, image_size=tuple(images.shape[-2:]), residual="normalized")(images)[1]
    torch.testing.assert_close(scaled, _reference(model, images, residual="normalized", normalize=True), **TOL)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_export_gives_the_eager_maps(name):
    model, images = make_model(name)
    explained = ExplainedViT(model, image_size=tuple(images.shape[-2:]), normalize=False).eval()
    program = torch.export.export(explained, (images,))
    logits, maps = program.module()(images)
    torch.testing.assert_close(maps, _reference(model, images), **TOL)
    torch.testing.assert_close(logits, model(images), **TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_runtime_gives_the_eager_maps(name, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, images = make_model(name)
    explained = ExplainedViT(model, image_size=tuple(images.shape[-2:]), normalize=False).eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(explained, (images,), str(path), dynamo=True, input_names=["images"],
                      output_names=["logits", "maps"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, maps = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(maps), _reference(model, images), **TOL)
    torch.testing.assert_close(torch.from_numpy(logits), model(images).detach(), **TOL)


@pytest.mark.parametrize("name", ["vit_avgpool"])
def test_models_without_the_fast_path_are_refused(name):
    model, _ = make_model(name)
    with pytest.raises(UnsupportedModelError, match="ExplainedViT computes the exact fast path, which does not apply: "
                       "it needs a head that reads only prefix tokens"):
        ExplainedViT(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_method_and_the_exported_module_run_on_cuda_as_on_cpu():
    from captum_vit import AttentionGuidedGradCAM, AttentionRollout, GradientRollout, TransformerAttribution

    model, images = make_model("deit_tiny")
    target = torch.tensor([1, 2])
    methods = (AttentionGuidedGradCAM, AttentionRollout, GradientRollout, TransformerAttribution)
    cpu = [m(model).attribute(images, target=target, normalize=False) for m in methods]
    cpu_explained = ExplainedViT(model, image_size=(112, 112), normalize=False)(images)[1]
    cpu_second_last = LayerReciproCAM(model, model.blocks[-2]).attribute(images, target=target, normalize=False)
    gpu_model = model.cuda()
    for method, expected in zip(methods, cpu):
        got = method(gpu_model).attribute(images.cuda(), target=target.cuda(), normalize=False)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(ExplainedViT(gpu_model, image_size=(112, 112), normalize=False)(images.cuda())[1].cpu(),
                               cpu_explained, atol=1e-4, rtol=1e-3)
    second_last = LayerReciproCAM(gpu_model, gpu_model.blocks[-2])  # the earlier-block fast path on the GPU
    got = second_last.attribute(images.cuda(), target=target.cuda(), normalize=False)
    assert second_last.last_path == "fast"
    torch.testing.assert_close(got.cpu(), cpu_second_last, atol=1e-4, rtol=1e-3)
    model.cpu()


@pytest.mark.parametrize("name", FAMILIES)
def test_openvino_converts_it_and_gives_the_eager_maps_in_f32(name):
    ov = pytest.importorskip("openvino")
    model, images = make_model(name)
    explained = ExplainedViT(model, image_size=tuple(images.shape[-2:]), normalize=False).eval()
    converted = ov.convert_model(explained, example_input=(images,))
    # the CPU plugin computes in bf16 by default on CPUs that have it: f32 is asked for explicitly
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits, maps = compiled({0: images.numpy()}).values()
    torch.testing.assert_close(torch.from_numpy(maps), _reference(model, images), **TOL)
    torch.testing.assert_close(torch.from_numpy(logits), model(images).detach(), **TOL)


def _batches(name):
    """Examples of two sizes: the graph is exported at 2 (torch.export specialises a batch of 1) and run at 3."""
    model, images = make_model(name)
    more = torch.cat([images, images[:1].flip(-1)])
    return model, images, more


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_at_one_batch_runs_at_another(name, tmp_path):
    """A served model takes any batch: nothing in the graph reads the batch size as a Python number."""
    model, images, more = _batches(name)
    explained = ExplainedViT(model, image_size=tuple(images.shape[-2:]), normalize=False).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(explained, (images,), dynamic_shapes={"images": {0: batch}})
    logits, maps = program.module()(more)
    torch.testing.assert_close(maps, _reference(model, more), **TOL)
    torch.testing.assert_close(logits, model(more), **TOL)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(explained, (images,), str(path), dynamo=True, input_names=["images"],
                      output_names=["logits", "maps"], dynamic_shapes={"images": {0: batch}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, maps = session.run(None, {"images": more.numpy()})
    torch.testing.assert_close(torch.from_numpy(maps), _reference(model, more), **TOL)
    ov = pytest.importorskip("openvino")
    converted = ov.convert_model(explained, example_input=(images[:1],))  # the reported case: converted at 1
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for x in (more, torch.cat([images, images])):
        _, maps = compiled({0: x.numpy()}).values()
        torch.testing.assert_close(torch.from_numpy(maps), _reference(model, x), **TOL)

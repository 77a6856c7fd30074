"""Evaluations under torch.distributed (CPU processes, gloo): the single-process result, one shared folder."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _setup():
    from conftest import make_model

    from captum_vit.methods import explainer

    torch.manual_seed(0)
    model, images = make_model("vit_reg4")
    g = torch.Generator().manual_seed(3)
    data = torch.randn(10, 3, 64, 64, generator=g)
    labels = torch.randint(0, 10, (10,), generator=g)
    loader = [(data[i : i + 2], labels[i : i + 2]) for i in range(0, 10, 2)]  # 5 batches: uneven over 2 ranks
    return model, explainer("reciprocam", model), loader


def _rank(rank: int, world: int, port: int, out: str, checkpoints: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from captum_vit.metrics import evaluate_adcc

        model, explain, loader = _setup()
        result = evaluate_adcc(model, explain, loader, use_labels=True, checkpoint_dir=checkpoints, progress=False)
        torch.save(vars(result), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _one_thread():
    """The ranks compute with one thread each; so does the single process they are compared with bit for bit
    (matrix products may sum in another order with another thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_processes_give_the_single_process_result(tmp_path, world):
    from captum_vit.metrics import evaluate_adcc

    model, explain, loader = _setup()
    with _one_thread():
        single = evaluate_adcc(model, explain, loader, use_labels=True, progress=False)
    mp.spawn(_rank, args=(world, _free_port(), str(tmp_path), str(tmp_path / "runs")), nprocs=world, join=True)
    for rank in range(world):
        merged = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in vars(single).items():
            assert torch.equal(merged[name], value), f"rank {rank}: {name} differs"
    files = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert files == ["batch_00000.pt", "batch_00001.pt", "batch_00002.pt", "batch_00003.pt", "batch_00004.pt",
                     "manifest.json"]
    resumed = evaluate_adcc(model, explain, loader, use_labels=True, progress=False, checkpoint_dir=tmp_path / "runs")
    assert torch.equal(resumed.adcc, single.adcc)  # one process resumes the ranks' files


ROUNDS = 40


def _race_rank(rank: int, world: int, port: int, root: str) -> None:
    """Every rank opens the same fresh folder at the same instant, ROUNDS times; then restarts a used one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from captum_vit.metrics import CheckpointDirectory

        identity = {"method": "reciprocam", "model": "m"}
        for i in range(ROUNDS):
            dist.barrier()
            CheckpointDirectory(f"{root}/fresh{i}", identity).check_manifest(4)
        # a folder of another run: restart deletes it once (rank 0), nobody deletes what others write next
        dist.barrier()
        folder = CheckpointDirectory(f"{root}/used", {"method": "agcam", "model": "m"}, restart=True)
        folder.check_manifest(4)
        folder.save(rank, "digest", {"value": torch.full((2,), float(rank))})
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_many_processes_start_a_checkpointed_run_in_one_fresh_folder(tmp_path, world):
    from captum_vit.metrics import MANIFEST, CheckpointDirectory

    old = CheckpointDirectory(tmp_path / "used", {"method": "reciprocam", "model": "m"})
    old.check_manifest(4)
    for index in range(6):
        old.save(index, "digest", {"value": torch.zeros(2)})
    mp.spawn(_race_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)  # raises on any rank's error
    for i in range(ROUNDS):
        files = sorted(p.name for p in (tmp_path / f"fresh{i}").iterdir())
        assert files == [MANIFEST], f"round {i}: {files}"  # no temporary file left behind
        assert json.loads((tmp_path / f"fresh{i}" / MANIFEST).read_text()) == {
            "method": "reciprocam", "model": "m", "batch_size": 4}
    used = sorted(p.name for p in (tmp_path / "used").iterdir())
    assert used == [*(f"batch_{r:05d}.pt" for r in range(world)), MANIFEST]
    assert json.loads((tmp_path / "used" / MANIFEST).read_text())["method"] == "agcam"


def _evidence_setup():
    from conftest import randomize
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = randomize(VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=6))
    backgrounds = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, backgrounds, dict(methods=["reciprocam-authors", "random"], n=5, batch_size=2, progress=False)


def _evidence_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from captum_vit.metrics import evaluate_known_evidence

        model, backgrounds, options = _evidence_setup()
        torch.save(evaluate_known_evidence(model, backgrounds=backgrounds, **options).values, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_known_evidence_on_two_gloo_processes_gives_the_single_process_result(tmp_path):
    from captum_vit.metrics import evaluate_known_evidence

    model, backgrounds, options = _evidence_setup()
    with _one_thread():
        single = evaluate_known_evidence(model, backgrounds=backgrounds, **options).values
    mp.spawn(_evidence_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        merged = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(merged) == list(single)
        assert set(single) == {"reciprocam-authors", "random"}  # both ran: none was refused
        for method, metrics in single.items():
            assert list(merged[method]) == list(metrics)
            for name, value in metrics.items():  # 3 batches over 2 ranks, the random control included
                assert torch.equal(merged[method][name], value), f"rank {rank}: {method} {name} differs"


def _dataset_setup():
    from conftest import make_model

    model, _ = make_model("vit_reg4")
    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(11, 3, 64, 64, generator=g), torch.randint(0, 10, (11,), generator=g))
    return model, data, dict(methods=["reciprocam-fast", "random"], metrics=["adcc", "deletion", "constant"],
                             batch_size=3, progress=False, deletion_steps=4)


def _dataset_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from captum_vit.metrics import evaluate

        model, data, options = _dataset_setup()
        result = evaluate(model, data=data, checkpoint_dir=f"{out}/runs", **options)
        torch.save({"values": result.values, "indices": result.indices}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_runner_on_a_dataset_shards_it_and_merges_exactly(tmp_path):
    """A map-style dataset: each rank loads only its own batches (4 batches of 3 and 2 images over 2 ranks)."""
    from captum_vit.metrics import evaluate

    model, data, options = _dataset_setup()
    with _one_thread():
        single = evaluate(model, data=data, **options)
    mp.spawn(_dataset_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        merged = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(merged["indices"], torch.arange(11))
        for method, fields in single.values.items():
            for name, value in fields.items():
                assert torch.equal(merged["values"][method][name], value), f"rank {rank}: {method} {name}"
    assert sorted(p.name for p in (tmp_path / "runs" / "random").iterdir()) == [
        "batch_00000.pt", "batch_00001.pt", "batch_00002.pt", "batch_00003.pt", "manifest.json"]

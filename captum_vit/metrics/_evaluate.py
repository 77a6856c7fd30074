"""Dataset-level evaluation with a progress bar, resumable batch by batch."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._adcc import ADCCResult, adcc
from ._checkpoint import CheckpointDirectory, method_identity, model_fingerprint, run_identity, tensor_digest


def _batch_images_labels(batch: Any):
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def evaluate_adcc(
    forward_func: Callable[..., Any],
    explain_func: Any,
    loader: Iterable[Any],
    use_labels: bool = False,
    checkpoint_dir: Optional[str | Path] = None,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
    baseline: float = 0.0,
    restart: bool = False,
    method_id: Optional[str] = None,
) -> ADCCResult:
    """ADCC over a ``DataLoader`` (or any iterable of ``images`` or ``(images, labels)``).

    Args:
        forward_func: the model.
        explain_func: Captum ``Attribution`` or callable ``(inputs, target) -> maps``.
        loader: batches of ``(B, C, H, W)`` images (with ``(B,)`` labels), in a fixed order.
        use_labels: explain the labels instead of the predicted classes.
        checkpoint_dir: if given, each finished batch is written there as
            ``batch_00000.pt`` as soon as it is done, and batches already
            there are loaded instead of recomputed: an interrupted run
            resumes where it stopped. ``manifest.json`` records the run
            (method, weights, batch size, dataset size, label mode, baseline,
            library version) and each file a digest of its inputs; files of
            another run are refused with the first difference named, and a
            damaged file is recomputed with a warning.
        device: where to move each batch.
        progress: show a tqdm progress bar.
        baseline: see :func:`captum_vit.metrics.adcc`.
        restart: delete ``checkpoint_dir``'s results first and start over.
        method_id: how the manifest names the method; needed only to tell
            apart closures or lambdas with different options (an
            ``Attribution``, a ``functools.partial`` and the registry's
            explainers describe themselves).

    Returns:
        :class:`ADCCResult` over every example, in loader order.

    Under ``torchrun`` (an initialised ``torch.distributed`` group; gloo on
    CPU, NCCL on GPU) rank ``r`` of ``W`` explains batches ``r, r + W, ...``
    (every rank iterates the loader, which must give the same batches in the
    same order everywhere), writes its own batch files into the shared
    ``checkpoint_dir``, and every rank returns the merged result, equal to a
    single process's. Pass each rank's ``device``.
    """
    if not isinstance(baseline, (int, float)) or isinstance(baseline, bool) or not math.isfinite(baseline):
        raise ValueError(f"baseline must be a finite number; got {baseline!r}.")
    checkpoints = None
    if checkpoint_dir is not None:
        identity = run_identity(
            method_id or method_identity(explain_func), model_fingerprint(forward_func), loader, use_labels, baseline
        )
        checkpoints = CheckpointDirectory(checkpoint_dir, identity, restart=restart)
        checkpoints.check_manifest(getattr(loader, "batch_size", None))  # refuse before any work when possible
    names = [f.name for f in fields(ADCCResult)]
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    rank, world = distributed_rank_and_size()
    results: Dict[int, ADCCResult] = {}
    bar = tqdm(loader, total=total, desc="ADCC", unit="batch", disable=not progress or rank != 0)
    for i, batch in enumerate(bar):
        images, labels = _batch_images_labels(batch)
        if checkpoints is not None and i == 0 and isinstance(images, Tensor):
            # every rank sees batch 0, so every rank records the same batch size (its own first batch may be
            # the shorter last one)
            checkpoints.check_manifest(int(images.shape[0]))
        if i % world != rank:  # under torchrun, rank r explains batches r, r + world, ...
            continue
        if not isinstance(images, Tensor):
            raise TypeError(f"batch {i} of the loader holds {type(images).__name__}, not a tensor of images.")
        if use_labels and labels is None:
            raise ValueError("use_labels=True needs a loader of (images, labels) batches.")
        result = None
        if checkpoints is not None:
            digest = tensor_digest(images, labels if use_labels else None)
            saved = checkpoints.load(i, digest, names)
            result = ADCCResult(**saved) if saved is not None else None
        if result is None:
            if device is not None:
                images = images.to(device)
            target = labels if use_labels else None
            result = adcc(forward_func, explain_func, images, target=target, baseline=baseline)
            if checkpoints is not None:
                checkpoints.save(i, digest, vars(result))
        results[i] = result
        bar.set_postfix(adcc=f"{ADCCResult.cat(list(results.values())).summary()['adcc_of_means']:.1f}")
    if world > 1:
        results = _gather_batches(results, names)
    if not results:
        raise ValueError("the loader yielded no batches.")
    return ADCCResult.cat([results[i] for i in sorted(results)])


def join_torchrun(device: torch.device | str = "cpu") -> Optional[torch.device]:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA).

    Returns the device this process should use (``cuda:LOCAL_RANK`` on CUDA),
    or ``None`` outside ``torchrun`` (``WORLD_SIZE`` unset or 1), where
    nothing is done. The caller destroys the group when finished.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def distributed_rank_and_size() -> Tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_batches(mine: Dict[int, ADCCResult], names: List[str]) -> Dict[int, ADCCResult]:
    """Every rank's batches on every rank, by batch index (so the merge is the single-process result)."""
    payload = {i: {n: getattr(r, n).cpu() for n in names} for i, r in mine.items()}
    return {i: ADCCResult(**fields_) for part in from_every_rank(payload) for i, fields_ in part.items()}


def from_every_rank(value: Any) -> List[Any]:
    """``value`` of every rank of the initialised ``torch.distributed`` group, in rank order."""
    import torch.distributed as dist

    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered

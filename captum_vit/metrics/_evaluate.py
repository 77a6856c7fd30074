"""Dataset-level evaluation with a progress bar, resumable batch by batch."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ._adcc import ADCCResult
from ._checkpoint import method_identity
from ._maps import as_explain_func


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

    The ADCC metric of `captum_vit.metrics.evaluate`, for one explainer.

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
        baseline: see `captum_vit.metrics.adcc`.
        restart: delete ``checkpoint_dir``'s results first and start over.
        method_id: how the manifest names the method; needed only to tell
            apart closures or lambdas with different options (an
            ``Attribution``, a ``functools.partial`` and the registry's
            explainers describe themselves).

    Returns:
        `ADCCResult` over every example, in loader order.

    Under ``torchrun`` (an initialised ``torch.distributed`` group; gloo on
    CPU, NCCL on GPU) rank ``r`` of ``W`` explains batches ``r, r + W, ...``
    (every rank iterates the loader, which must give the same batches in the
    same order everywhere), writes its own batch files into the shared
    ``checkpoint_dir``, and every rank returns the merged result, equal to a
    single process's. Pass each rank's ``device``.
    """
    from .. import __version__
    from ._runner import EvaluationConfig, run_evaluation

    if not isinstance(baseline, (int, float)) or isinstance(baseline, bool) or not math.isfinite(baseline):
        raise ValueError(f"baseline must be a finite number; got {baseline!r}.")
    identity = {"method": method_id or method_identity(explain_func), "captum_vit_version": __version__,
                "baseline": float(baseline)}
    config = EvaluationConfig(use_labels=use_labels, device=device, progress=progress, baseline=float(baseline),
                              restart=restart, identity=identity)
    result = run_evaluation(forward_func, {"adcc": as_explain_func(explain_func)}, loader, ["adcc"], config,
                            checkpoint_folder=None if checkpoint_dir is None else (lambda _: Path(checkpoint_dir)))
    values = result.values["adcc"]
    return ADCCResult(**{f.name: values[f.name].bool() if f.name == "constant_map" else values[f.name]
                         for f in fields(ADCCResult)})

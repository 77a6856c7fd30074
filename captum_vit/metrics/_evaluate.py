"""Dataset-level evaluation with a progress bar, resumable batch by batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from ._adcc import ADCCResult, adcc


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
) -> ADCCResult:
    """ADCC over a ``DataLoader`` (or any iterable of ``images`` or ``(images, labels)``).

    Args:
        forward_func: the model.
        explain_func: Captum ``Attribution`` or callable ``(inputs, target) -> maps``.
        loader: batches, in a fixed order.
        use_labels: explain the labels instead of the predicted classes.
        checkpoint_dir: if given, each finished batch is written there as
            ``batch_00000.pt`` as soon as it is done, and batches already
            there are loaded instead of recomputed: an interrupted run
            resumes where it stopped. Use one directory per model/method.
        device: where to move each batch.
        progress: show a tqdm progress bar.
        baseline: see :func:`captum_vit.metrics.adcc`.
    """
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    results = []
    bar = tqdm(loader, total=total, desc="ADCC", unit="batch", disable=not progress)
    for i, batch in enumerate(bar):
        path = directory / f"batch_{i:05d}.pt" if directory is not None else None
        if path is not None and path.exists():
            results.append(ADCCResult(**torch.load(path)))
            continue
        images, labels = _batch_images_labels(batch)
        if device is not None:
            images = images.to(device)
        target = labels if use_labels else None
        result = adcc(forward_func, explain_func, images, target=target, baseline=baseline)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save(vars(result), tmp)
            tmp.replace(path)  # atomic: a killed run never leaves half a batch
        results.append(result)
        bar.set_postfix(adcc=f"{ADCCResult.cat(results).summary()['adcc_of_means']:.1f}")
    if not results:
        raise ValueError("the loader yielded no batches.")
    return ADCCResult.cat(results)

"""Checkpoint directories with an identity: what run wrote them, and on which data.

A resumable evaluation writes one file per finished batch. Resuming is only
right when the files come from the same run: the same method and options,
the same weights, the same data in the same order and batch size, the same
label mode and library version. ``manifest.json`` records that identity when
the first batch is written, and every batch file records a digest of its
inputs, so a resumed run refuses files from another run (naming the first
difference) instead of mixing them into its result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from .._utils import module_of

MANIFEST = "manifest.json"
_BATCH_GLOB = "batch_*.pt"


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds another run's results."""


def tensor_digest(*tensors: Optional[Tensor]) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (``None`` entries included as such)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(forward_func: Any) -> str:
    """Digest of the weights of ``forward_func`` (a module, or a bound method of one)."""
    module = module_of(forward_func)
    if not isinstance(module, nn.Module):
        return f"callable {_qualified_name(forward_func)} (weights not visible)"
    state = module.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_digest(state[name]).encode())
    return f"{type(module).__name__} {h.hexdigest()[:16]}"


def method_identity(explain_func: Any) -> str:
    """A description of the explainer and its options, for the manifest.

    Our method registry's explainers carry ``identity`` (name and options);
    a Captum ``Attribution`` is described by its class (and layer); for any
    other callable, its qualified name. Closures with different options look
    the same: pass ``method_id`` to `evaluate_adcc` for those.
    """
    identity = getattr(explain_func, "identity", None)
    if isinstance(identity, str):
        return identity
    if isinstance(explain_func, functools.partial):
        keywords = ", ".join(f"{k}={v!r}" for k, v in sorted(explain_func.keywords.items()))
        return f"{_qualified_name(explain_func.func)}({keywords})"
    from captum.attr import Attribution

    if isinstance(explain_func, Attribution):
        name = type(explain_func).__qualname__
        index = getattr(explain_func, "block_index", None)
        return f"{name}(block {index})" if index is not None else name
    return _qualified_name(explain_func)


def _qualified_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _private_temporary(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _write_once(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; ``False`` if another writer was first.

    The text goes to a private temporary file which is then linked to
    ``path``: creation is atomic and exclusive, so processes starting a run in
    one folder at the same instant never see half a file, and exactly one of
    them writes it (the others then read and compare it). Where the file
    system has no hard links, ``os.replace`` publishes it instead (still
    atomic; identical identities make the last writer harmless).
    """
    tmp = _private_temporary(path)
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network or FAT file systems)
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _rank_and_barrier() -> "tuple[int, Any]":
    """This process's rank and a barrier over the initialised ``torch.distributed`` group (else 0, a no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return 0, lambda: None


class CheckpointDirectory:
    """One run's batch files and manifest.

    Safe for many processes on one folder (``torchrun`` ranks): the manifest
    is created exclusively by whichever process comes first and checked by
    all; each batch file is written by the one process that computed it,
    through a temporary file of its own.

    Args:
        path: the directory (created if missing).
        identity: what must match for files to be reused (JSON-serialisable).
        restart: delete this directory's manifest and batch files first.
            Under an initialised ``torch.distributed`` group every rank must
            construct the directory (a collective call): rank 0 deletes, and
            the others wait for it, so no rank deletes another's new files.
    """

    def __init__(self, path: str | Path, identity: Dict[str, Any], restart: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"checkpoint directory {self.path} is a file; give a directory path.")
        self.path.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        if restart:
            rank, barrier = _rank_and_barrier()
            if rank == 0:
                for file in [self.path / MANIFEST, *self.path.glob(_BATCH_GLOB)]:
                    file.unlink(missing_ok=True)
            barrier()
        self._manifest_checked = False

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def check_manifest(self, first_batch_size: Optional[int]) -> None:
        """Refuse another run's directory; write the manifest of a new one.

        With ``first_batch_size=None`` (not known before the first batch)
        only an existing manifest's other fields are checked.
        """
        if self._manifest_checked:
            return
        expected: Dict[str, Any] = dict(self.identity)
        if first_batch_size is not None:
            expected["batch_size"] = first_batch_size
        elif not self.manifest_path.exists():
            return
        # the most telling difference first: what was run, on which weights, then how the data was cut
        order = ["method", "model", "batch_size"]
        expected = {k: expected[k] for k in [*order, *sorted(set(expected) - set(order))] if k in expected}
        if not self.manifest_path.exists():
            if any(self.path.glob(_BATCH_GLOB)):
                raise CheckpointMismatchError(
                    f"{self.path} holds batch files without {MANIFEST} (written by captum_vit < 0.3 or another "
                    "tool), so which run wrote them is unknown. Pass restart=True (CLI: --restart) to start over."
                )
            if _write_once(self.manifest_path, json.dumps(expected, indent=2, sort_keys=True)):
                self._manifest_checked = first_batch_size is not None
                return
        self._compare_manifest(expected)  # an earlier run's, or another process's that was first
        self._manifest_checked = first_batch_size is not None

    def _compare_manifest(self, expected: Dict[str, Any]) -> None:
        try:
            found = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointMismatchError(
                f"{self.manifest_path} cannot be read ({err}); pass restart=True (CLI: --restart) to start over."
            ) from None
        for key, value in expected.items():
            if found.get(key) != value:
                raise CheckpointMismatchError(
                    f"{self.path} holds another run's results: {key} is {found.get(key)!r} there but "
                    f"{value!r} now. Use another directory, or pass restart=True (CLI: --restart) to delete "
                    "its results and start over."
                )

    def batch_path(self, index: int) -> Path:
        return self.path / f"batch_{index:05d}.pt"

    def load(self, index: int, inputs_digest: str, fields: Iterable[str]) -> Optional[Dict[str, Tensor]]:
        """Batch ``index``'s saved fields, ``None`` if absent or damaged (with a warning).

        Raises `CheckpointMismatchError` when the file was computed on
        other inputs (the data or its order changed).
        """
        path = self.batch_path(index)
        if not path.exists():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            missing = [f for f in fields if f not in saved]
            if missing or "inputs_digest" not in saved:
                raise ValueError(f"missing {', '.join(missing) or 'inputs_digest'}")
            lengths = {int(saved[f].shape[0]) for f in fields}
            if len(lengths) != 1:
                raise ValueError("fields of different lengths")
        except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed, and said so
            warnings.warn(
                f"checkpoint file {path} is damaged ({type(err).__name__}: {err}); recomputing that batch.",
                stacklevel=3,
            )
            return None
        if saved["inputs_digest"] != inputs_digest:
            raise CheckpointMismatchError(
                f"{path} was computed on other inputs than batch {index} now: the dataset or its order changed "
                "(a shuffling DataLoader?). Use a fixed order, another directory, or restart=True (CLI: --restart)."
            )
        return {f: saved[f] for f in fields}

    def save(self, index: int, inputs_digest: str, values: Dict[str, Tensor]) -> None:
        path = self.batch_path(index)
        tmp = _private_temporary(path)
        torch.save(dict(values, inputs_digest=inputs_digest), tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a batch

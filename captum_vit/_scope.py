"""Explanations that act only on their own forward passes.

PyTorch module hooks are global to the module: a hook registered on a block
acts on every forward pass through that block, in every thread. An
explanation registers hooks for a few forward passes; a serving thread
calling ``model(x)`` at the same moment would otherwise get masked copies
or explicit attention it never asked for.

Two rules make an explanation safe beside a live model:

- every hook captum_vit registers is *scoped*: it acts only when the forward
  pass runs inside the explanation that registered it (a
  `contextvars.ContextVar` token, so per thread and per asyncio task)
  and passes everything through untouched otherwise;
- explanations of one model are serialised by a per-model re-entrant lock,
  because they share the model's hook lists and the flags an explanation
  switches off and restores (gradient checkpointing).

Plain forward passes take no lock and are never delayed. A ``forward_func``
that runs the model in *other* threads (``nn.DataParallel`` over several
GPUs) does not see the scoped hooks; the explainers then stop with an error
saying the model ran outside the calling thread, never with a silent map.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

from torch import nn

_CURRENT: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("captum_vit_explanation", default=None)
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def explanation(model: nn.Module) -> Iterator[object]:
    """Run one explanation of ``model``: serialised with others on it, hooks scoped to it.

    Re-entrant in one thread (an explanation inside another one's
    ``forward_func`` gets its own scope; the outer one's hooks pause meanwhile).
    """
    with _model_lock(model):
        token = object()
        reset = _CURRENT.set(token)
        try:
            yield token
        finally:
            _CURRENT.reset(reset)


def scoped(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` acting only inside the explanation that is current now; ``None`` (no change) elsewhere."""
    token = _CURRENT.get()
    if token is None:
        raise RuntimeError("captum_vit internal error: a hook was registered outside an explanation scope.")

    @functools.wraps(hook)
    def scoped_hook(*args: Any, **kwargs: Any) -> Any:
        if _CURRENT.get() is not token:
            return None
        return hook(*args, **kwargs)

    return scoped_hook

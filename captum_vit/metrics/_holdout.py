"""Leave-one-model-out: advice chosen on some models and scored on the one it was not chosen on.

A *candidate* is anything that can be recommended: a registry method, a
ViT-ReciproCAM setting, a default. For every model in turn, the candidate
with the best mean score over the *other* models is chosen and its
per-image values on the left-out model are reported, so no figure scores a
choice on the model it was chosen on (docs/evidence.md).

Refusals are part of the advice: a candidate that does not run on a model
(an attention method on a model without a class token) is ranked by the
training models where it runs, if it runs on at least half of them; on the
left-out model the best-ranked candidate that runs there is taken (as a
user would take the next recommendation where the first refuses), and the
result says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from ._evidence import bootstrap_interval

#: scores[model][candidate][field] -> (n,) per-image values; a candidate absent for a model did not run on it
Scores = Mapping[str, Mapping[str, Mapping[str, Tensor]]]


@dataclass
class HeldOutChoice:
    """One fold: the candidate chosen without ``held_out`` and what it scores there.

    ``ranking``: the candidates in the order chosen on ``training`` (best
    first), each with its mean ranking key over the training models where
    it runs; ``chosen``: the first of them that runs on ``held_out``
    (``fallback`` is True when that is not the first); ``values``: its
    per-image values on ``held_out``.
    """

    held_out: str
    training: Tuple[str, ...]
    ranking: List[Tuple[str, Tuple[float, ...]]]
    chosen: str
    fallback: bool
    values: Dict[str, Tensor]

    def summary(self, resamples: int = 1000, seed: int = 0) -> Dict[str, Dict[str, float]]:
        """``{field: {"mean", "lo", "hi", "n"}}`` on the held-out model, 95 % bootstrap interval."""
        return {k: bootstrap_interval(v, resamples, seed=seed) for k, v in self.values.items()}


def rank_candidates(scores: Scores, models: Sequence[str], keys: Sequence[str],
                    candidates: Optional[Sequence[str]] = None) -> List[Tuple[str, Tuple[float, ...]]]:
    """Candidates ordered by the mean over ``models`` of their per-model means of ``keys`` (compared in
    order: the first key decides, the next breaks ties), best first.

    Only candidates that run on at least half of ``models`` are ranked; the mean is over those they run on.
    """
    if not models:
        raise ValueError("rank_candidates needs at least one model to choose on.")
    if not keys:
        raise ValueError("give at least one field to rank by (e.g. keys=('pointing',)).")
    pool = list(candidates) if candidates is not None else sorted({c for m in models for c in scores[m]})
    ranked = []
    for candidate in pool:
        runs_on = [m for m in models if candidate in scores[m]]
        if 2 * len(runs_on) < len(models):
            continue
        means = tuple(sum(float(scores[m][candidate][k].float().mean()) for m in runs_on) / len(runs_on)
                      for k in keys)
        ranked.append((candidate, means))
    # sorted() is stable: equal keys keep the order of `candidates`, so a tie goes to the earlier one
    return sorted(ranked, key=lambda item: tuple(-v for v in item[1]))


def leave_one_model_out(scores: Scores, keys: Sequence[str] = ("pointing", "evidence_mass"),
                        candidates: Optional[Sequence[str]] = None) -> List[HeldOutChoice]:
    """One `HeldOutChoice` per model of ``scores`` (at least two), in its order.

    Args:
        scores: ``scores[model][candidate][field]`` per-image ``(n,)`` values;
            a candidate missing for a model did not run on it.
        keys: fields that rank candidates (higher is better), in priority order.
        candidates: the candidates to choose among, in the order that breaks
            exact ties (default: every candidate, sorted by name).
    """
    models = list(scores)
    if len(models) < 2:
        raise ValueError(f"leave-one-model-out needs at least two models; got {len(models)}.")
    folds = []
    for held_out in models:
        training = tuple(m for m in models if m != held_out)
        ranking = rank_candidates(scores, training, keys, candidates)
        runnable = [c for c, _ in ranking if c in scores[held_out]]
        if not runnable:
            raise ValueError(f"none of the candidates chosen without {held_out!r} runs on {held_out!r}.")
        chosen = runnable[0]
        folds.append(HeldOutChoice(held_out, training, ranking, chosen, fallback=chosen != ranking[0][0],
                                   values=dict(scores[held_out][chosen])))
    return folds

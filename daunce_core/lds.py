"""The linear datamodeling score (LDS) and its ground truth (paper Appendix B, eqs. (12)–(13)).

Ground truth: draw M subsets ``S_1..S_M`` of the training set, each of ``round(α·n)`` examples
(α = 0.5), retrain the model from scratch on each with S seeds, and record every query's
measurement. `retrain_on_subsets` trains all M × S models with the vectorised trainer of the
perturbed copies (`daunce_core.training.train_copies`), in groups.

Score: for query j, the Spearman correlation over m = 1..M between the predicted group effect
``Σ_{i∈S_m} scores[i, j]`` and the true outcome averaged over seeds. Scores are oriented
``[n_train, m_query]`` and positive for proponents (training on i lowers j's loss), so the
outcome is the *negated* loss (or the margin): both rise when proponents are present. The LDS is
the mean over queries, reported with its standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from daunce_core.copies import stack_copies, trainable_names
from daunce_core.data import ExampleSet, num_examples
from daunce_core.errors import DaunceError
from daunce_core.evaluation import evaluate_copies
from daunce_core.metrics import spearman_columns
from daunce_core.perturbation import PerturbationDraw, stream_rng
from daunce_core.task import Measurement, Task
from daunce_core.training import TrainConfig, train_copies

_LDS_STREAM = 7


def lds_subsets(n: int, count: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` random subsets of ``round(α·n)`` training examples: a ``[M, n]`` bool mask."""
    size = round(alpha * n)
    if not 0 < size < n or count < 2:
        raise DaunceError(
            f"need 0 < round(alpha·n) < n and at least 2 subsets; got alpha={alpha}, n={n}, "
            f"count={count}."
        )
    masks = np.zeros((count, n), dtype=bool)
    for m in range(count):
        masks[m, stream_rng(seed, m, _LDS_STREAM).choice(n, size=size, replace=False)] = True
    return masks


@dataclass
class LDSResult:
    """The LDS of one score matrix.

    Attributes:
        per_query: Spearman correlation of each query, ``[m]`` (NaN where undefined).
        mean: mean over the defined queries.
        stderr: standard error of that mean.
    """

    per_query: np.ndarray
    mean: float
    stderr: float


def linear_datamodeling_score(
    scores: np.ndarray, subsets: np.ndarray, outcomes: np.ndarray
) -> LDSResult:
    """LDS of ``scores`` ``[n_train, m_query]`` against retrained outcomes.

    Args:
        scores: ``scores[i, j]``, influence of train i on query j (positive = proponent).
        subsets: ``[M, n_train]`` bool masks of the retraining subsets.
        outcomes: ``[M, m_query]`` (or ``[M, S, m_query]``, averaged over seeds) true outcomes,
            higher = better for the query: the negated loss, or the margin.
    """
    scores, subsets = np.asarray(scores, dtype=np.float64), np.asarray(subsets, dtype=bool)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    outcomes = outcomes.mean(axis=1) if outcomes.ndim == 3 else outcomes
    if subsets.shape[1] != scores.shape[0] or outcomes.shape != (len(subsets), scores.shape[1]):
        raise DaunceError(
            f"shapes do not match: scores {scores.shape} (n × m), subsets {subsets.shape} "
            f"(M × n), outcomes {outcomes.shape} (M × m)."
        )
    per_query = spearman_columns(subsets.astype(np.float64) @ scores, outcomes)
    defined = per_query[np.isfinite(per_query)]
    if len(defined) == 0:
        raise DaunceError("no query has a defined LDS (constant predictions or outcomes).")
    stderr = float(defined.std(ddof=1) / np.sqrt(len(defined))) if len(defined) > 1 else 0.0
    return LDSResult(per_query=per_query, mean=float(defined.mean()), stderr=stderr)


def retrain_on_subsets(
    make_model: Callable[[int], nn.Module],
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    subsets: np.ndarray,
    config: TrainConfig,
    *,
    seeds: int = 3,
    l2: float = 0.0,
    measurement: Measurement = "loss",
    group_size: int = 64,
) -> np.ndarray:
    """Retrain from scratch on each subset with each seed; outcomes ``[M, S, m_query]``.

    Model ``(m, s)`` starts from ``make_model(s)`` (so seed s shares its initialisation across
    subsets, as a retraining recipe would) and visits its subset in an order drawn from
    ``(s, m)``. The outcome is the negated loss (or the margin) of each query.
    """
    jobs = [(m, s) for m in range(len(subsets)) for s in range(seeds)]
    outcomes = np.empty((len(subsets), seeds, num_examples(queries)))
    for start in range(0, len(jobs), group_size):
        group = jobs[start : start + group_size]
        values = _retrain_group(
            make_model, task, train, queries, subsets, group, config, l2, measurement
        )
        for (m, s), row in zip(group, values, strict=True):
            outcomes[m, s] = -row  # measurements are stored lower-is-better (loss, −margin)
    return outcomes


def _retrain_group(make_model, task, train, queries, subsets, group, config, l2, measurement):
    model = make_model(0).eval()  # vectorised training: no dropout noise, frozen norm stats
    names = trainable_names(model, task)
    inits = {s: stack_copies(make_model(s), names, 1) for s in {s for _, s in group}}
    init = {n: torch.cat([inits[s][n] for _, s in group]) for n in names}
    n = num_examples(train)
    draws = [
        PerturbationDraw(
            k=m * 100_003 + s,
            subset=np.flatnonzero(subsets[m]),
            xi=np.full(n, 0.5),
            source=m * 100_003 + s,
        )
        for m, s in group
    ]

    def erm(outputs, batch, side):
        return task.loss_from_outputs(outputs, batch)

    trained = train_copies(model, task, train, draws, erm, config, names=names, l2=l2, init=init)
    if trained.diverged.any():
        raise DaunceError("a ground-truth retraining diverged; lower the learning rate.")
    values = evaluate_copies(model, task, trained.params, queries, measurement=measurement)
    return values.double().numpy()

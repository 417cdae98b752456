"""The linear datamodeling score (LDS) and its ground truth (paper Appendix B, eqs. (12)–(13)).

Ground truth: draw M subsets ``S_1..S_M`` of the training set, each of ``round(α·n)`` examples
(α = 0.5), retrain the model from scratch on each with S seeds, and record every query's
measurement. `retrain_on_subsets` trains all M × S models with the vectorised trainer of the
perturbed copies (`daunce_core.access.torch_module.training.train_copies`), in groups.

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

from daunce_core.access.task import Measurement, Task
from daunce_core.access.torch_module.evaluation import evaluate_copies
from daunce_core.access.torch_module.stacked import stack_copies, trainable_names
from daunce_core.access.torch_module.training import train_copies
from daunce_core.data import ExampleSet, num_examples
from daunce_core.errors import DaunceError
from daunce_core.evaluation.metrics import spearman_columns
from daunce_core.method.config import TrainConfig
from daunce_core.method.draws import PerturbationDraw, Stream, stream_rng


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
        masks[m, stream_rng(seed, m, Stream.LDS_SUBSETS).choice(n, size=size, replace=False)] = True
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
        scores: ``scores[i, j]``, influence of train i on query j (positive = proponent); any
            array-like with row slicing (numpy, memmap, zarr): it is read in row chunks.
        subsets: ``[M, n_train]`` bool masks of the retraining subsets.
        outcomes: ``[M, m_query]`` (or ``[M, S, m_query]``, averaged over seeds) true outcomes,
            higher = better for the query: the negated loss, or the margin.
    """
    subsets = np.asarray(subsets, dtype=bool)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    outcomes = outcomes.mean(axis=1) if outcomes.ndim == 3 else outcomes
    if (
        len(scores.shape) != 2
        or subsets.shape[1] != scores.shape[0]
        or outcomes.shape != (len(subsets), scores.shape[1])
    ):
        raise DaunceError(
            f"shapes do not match: scores {tuple(scores.shape)} (n × m), subsets "
            f"{subsets.shape} (M × n), outcomes {outcomes.shape} (M × m)."
        )
    return lds_of_effects(group_effects(scores, subsets), outcomes)


def group_effects(scores, subsets: np.ndarray, row_chunk: int = 8192) -> np.ndarray:
    """Predicted effect of each subset on each query, ``Σ_{i∈S_m} scores[i, j]``: ``[M, m]``.

    Reads ``scores`` in chunks of ``row_chunk`` training rows, so memory stays bounded by
    ``row_chunk × m`` whatever the number of training examples.

    Raises:
        DaunceError: the scores hold NaN or infinite values.
    """
    effects = np.zeros((len(subsets), scores.shape[1]))
    for start in range(0, scores.shape[0], row_chunk):
        block = np.asarray(scores[start : start + row_chunk], dtype=np.float64)
        if not np.isfinite(block).all():
            raise DaunceError(
                f"the scores hold non-finite values (rows {start}-{start + len(block) - 1}); "
                "every score must be a finite number."
            )
        effects += subsets[:, start : start + len(block)].astype(np.float64) @ block
    return effects


def lds_of_effects(effects: np.ndarray, outcomes: np.ndarray) -> LDSResult:
    """LDS from predicted subset effects ``[M, m]`` and true outcomes ``[M, m]`` (higher better)."""
    per_query = spearman_columns(effects, outcomes)
    defined = per_query[np.isfinite(per_query)]
    if len(defined) == 0:
        raise DaunceError("no query has a defined LDS (constant predictions or outcomes).")
    stderr = float(defined.std(ddof=1) / np.sqrt(len(defined))) if len(defined) > 1 else 0.0
    return LDSResult(per_query=per_query, mean=float(defined.mean()), stderr=stderr)


@dataclass(frozen=True)
class RetrainJob:
    """One model retrained from scratch: on the examples ``keep`` marks, from seed ``seed``.

    Attributes:
        keep: ``[n_train]`` bool mask of the examples it trains on.
        seed: initialisation seed (``make_model(seed)``), shared across jobs of that seed.
        order: key of the visiting order (drawn from ``(order, order)``): distinct per job.
    """

    keep: np.ndarray
    seed: int
    order: int


def retrain_jobs(
    make_model: Callable[[int], nn.Module],
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    jobs: list[RetrainJob],
    config: TrainConfig,
    *,
    l2: float = 0.0,
    outcome: str = "loss",
    group_size: int = 64,
    vectorize: bool = True,
) -> np.ndarray:
    """Retrain every job from scratch (vectorised, in groups); its outcome on each query.

    Returns ``[J, m_query]`` float64, lower is better, as `Task.outcome` defines it: the loss,
    the negated margin, or the 0/1 error. A job's result does not depend on the other jobs of
    its group, so jobs can be split over tasks and processes freely.
    """
    values = np.empty((len(jobs), num_examples(queries)))
    for start in range(0, len(jobs), group_size):
        group = jobs[start : start + group_size]
        values[start : start + len(group)] = _retrain_group(
            make_model, task, train, queries, group, config, l2, outcome, vectorize
        )
    return values


def lds_jobs(subsets: np.ndarray, seeds: int) -> list[RetrainJob]:
    """The M × S ground-truth jobs of `lds_subsets` masks, subset-major (``m * S + s``)."""
    return [
        RetrainJob(keep=subsets[m], seed=s, order=m * 100_003 + s)
        for m in range(len(subsets))
        for s in range(seeds)
    ]


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
    ``(s, m)``. The outcome is the negated loss (or the margin) of each query: higher is better.
    """
    values = retrain_jobs(
        make_model,
        task,
        train,
        queries,
        lds_jobs(subsets, seeds),
        config,
        l2=l2,
        outcome=measurement,
        group_size=group_size,
    )
    return -values.reshape(len(subsets), seeds, -1)


def _retrain_group(make_model, task, train, queries, group, config, l2, outcome, vectorize):
    model = make_model(0).eval()  # vectorised training: no dropout noise, frozen norm stats
    names = trainable_names(model, task)
    inits = {s: stack_copies(make_model(s), names, 1) for s in {job.seed for job in group}}
    init = {n: torch.cat([inits[job.seed][n] for job in group]) for n in names}
    n = num_examples(train)
    draws = []
    for job in group:
        if job.keep.shape != (n,) or not job.keep.any():
            raise DaunceError(
                f"a retraining job must keep a non-empty subset of the {n} training examples; "
                f"got a mask of shape {job.keep.shape} with {int(job.keep.sum())} kept."
            )
        draws.append(
            PerturbationDraw(
                k=job.order, subset=np.flatnonzero(job.keep), xi=np.full(n, 0.5), source=job.order
            )
        )

    def erm(outputs, batch, side):
        return task.loss_from_outputs(outputs, batch)

    trained = train_copies(
        model, task, train, draws, erm, config, names=names, l2=l2, init=init, vectorize=vectorize
    )
    if trained.diverged.any():
        raise DaunceError("a ground-truth retraining diverged; lower the learning rate.")
    values = evaluate_copies(
        model, task, trained.params, queries, measurement=outcome, vectorize=vectorize
    )
    return values.double().numpy()

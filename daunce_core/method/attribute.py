"""DAUNCE in a few lines, in memory: `attribute` a model's queries to its training examples.

``attribute`` runs Algorithm 1 end to end — perturbed copies, loss matrices ``A`` (K × n) and
``B`` (K × m), then covariance or correlation scores (paper eq. (6)), or the subspace-curvature
scores (the influence function in the copies' span, `daunce_core.method.subspace`) — and returns
an `Attribution`. Scores are oriented ``[n_train, m_query]``: ``scores[i, j]`` is the influence of
training example ``i`` on query ``j``; positive means training on ``i`` lowers the query's loss
(a proponent), negative raises it (an opponent). The pipeline (``flows/``) runs the same steps
out of core, with every intermediate result kept (the subspace scores for torch models).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from torch import nn

from daunce_core.access.base import CopyLosses
from daunce_core.access.task import Task
from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.errors import DaunceError, DaunceWarning
from daunce_core.method.config import ComputeConfig, DaunceConfig
from daunce_core.method.scores import (
    collect_statistics,
    self_influence,
    warn_constant,
    write_scores,
)
from daunce_core.method.subspace import SubspaceLosses, write_subspace_scores


@dataclass
class Attribution:
    """Result of `attribute`.

    Attributes:
        scores: ``[n_train, m_query]`` float32; ``scores[i, j]`` = influence of train ``i`` on
            query ``j`` (correlation, covariance or subspace, per the config).
        self_influence: ``[n_train]`` variance of each training loss across the copies (subspace
            scores: ``(1/n) A_iᵀ Q⁺ A_i``, what ``scores`` would give the example on itself)
            (high values flag mislabelled or atypical examples).
        losses_train: ``A``, ``[K, n_train]``; row k = copy k (NaN rows: diverged copies).
        losses_query: ``B``, ``[K, m_query]``.
        excluded: copy indices left out of the scores (non-finite losses).
        config: the configuration that produced it.
        subspace: for ``score="subspace"``: the reflected copies' measurements and the
            curvature ``Q`` (`daunce_core.method.subspace.SubspaceLosses`); else None.
    """

    scores: np.ndarray
    self_influence: np.ndarray
    losses_train: np.ndarray
    losses_query: np.ndarray
    excluded: np.ndarray
    config: DaunceConfig
    subspace: SubspaceLosses | None = None

    def _column(self, query: int) -> np.ndarray:
        if not 0 <= query < self.scores.shape[1]:
            raise DaunceError(
                f"query index {query} is out of range; there are {self.scores.shape[1]} queries."
            )
        return self.scores[:, query]

    def top_proponents(self, query: int, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` training examples with the highest scores for ``query``: (index, score)."""
        column = self._column(query)
        order = np.argsort(-column, kind="stable")[:k]
        return [(int(i), float(column[i])) for i in order]

    def top_opponents(self, query: int, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` training examples with the lowest (most negative) scores for ``query``."""
        column = self._column(query)
        order = np.argsort(column, kind="stable")[:k]
        return [(int(i), float(column[i])) for i in order]


def attribute(
    model: nn.Module,
    task: Task,
    train,
    queries,
    config: DaunceConfig | None = None,
    *,
    base_l2: float = 0.0,
    compute: ComputeConfig | None = None,
) -> Attribution:
    """Attribute ``queries`` to ``train`` examples with DAUNCE.

    Args:
        model: the trained model ``θ0`` (left unchanged).
        task: how to reach the model (e.g. `daunce_core.ClassificationTask`).
        train: training examples, a mapping of column name to tensor or array (``n`` rows).
        queries: query examples, same columns (``m`` rows).
        config: the run's configuration (default: `DaunceConfig()`).
        base_l2: the L2 strength the base model was trained with (default proximal λ).
        compute: group size, vectorisation, batch size and device (default `ComputeConfig()`).
    """
    config = config or DaunceConfig()
    warn_downcast(model, config)
    copies = TorchModuleAccess(
        model, task, train, queries, config, base_l2=base_l2, compute=compute
    )
    parts = None
    if config.score == "subspace":
        rows, parts = copies.run_subspace(range(config.num_models))
    else:
        rows = copies.run(range(config.num_models))
    stats = collect_statistics(rows.train, rows.query)
    warn_constant(stats, config.dtype)
    scores, own = _scores(rows, stats, config, parts)
    return Attribution(
        scores=scores,
        self_influence=own,
        losses_train=rows.train,
        losses_query=rows.query,
        excluded=stats.excluded_rows,
        config=config,
        subspace=parts,
    )


def warn_downcast(model: nn.Module, config: DaunceConfig) -> None:
    """Warn when the copies would run in a narrower float type than the model was given in.

    The copies are trained and measured in ``config.dtype``; a float64 model attributed in
    float32 loses the precision it was built with (losses that move little across the copies
    round to the same value), silently until now.
    """
    widest = max((p.dtype.itemsize for p in model.parameters() if p.is_floating_point()), default=0)
    wanted = config.torch_dtype.itemsize
    if widest > wanted:
        warnings.warn(
            f"the model's parameters are float{8 * widest}, and the copies run in "
            f"{config.dtype} (DaunceConfig.dtype): losses that move little across the copies "
            f"may round away. Set DaunceConfig(dtype='float{8 * widest}') to keep the model's "
            "precision, or cast the model to float32 to silence this warning.",
            DaunceWarning,
            stacklevel=3,
        )


def _scores(rows: CopyLosses, stats, config: DaunceConfig, parts: SubspaceLosses | None):
    """The config's scores over the valid copies, ``[n_train, m_query]``, and self-influence.

    Self-influence ``[n]``: the loss variance, or for subspace scores ``(1/n) A_iᵀ Q⁺ A_i``.
    """
    if parts is None:
        return write_scores(rows.train, rows.query, stats, kind=config.score), self_influence(stats)
    valid = np.zeros(len(rows.ks), dtype=bool)
    valid[stats.valid_rows] = True
    return write_subspace_scores(
        (parts.train.plus, parts.train.minus),
        (parts.query.plus, parts.query.minus),
        parts.curvature[np.ix_(valid, valid)],
        valid,
    )

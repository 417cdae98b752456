"""Perturbed copies of one base model, trained and evaluated by index (Algorithm 1, lines 1–4).

`PerturbedCopies` holds everything shared by the K copies — the base model in the run's dtype,
the data, the base signals — and produces the loss rows of any set of copy indices. Because each
copy depends only on ``(seed, k)``, rows can be computed in any grouping, on any worker, in any
order, and a missing row can be recomputed alone: this is what the pipeline maps over.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from daunce_core.access.task import Task, check_per_example
from daunce_core.access.torch_module.evaluation import evaluate_copies
from daunce_core.access.torch_module.stacked import trainable_names
from daunce_core.access.torch_module.training import TrainedCopies, train_copies
from daunce_core.data import as_example_set, cast_floating, check_compatible, num_examples, take
from daunce_core.errors import DaunceWarning, TaskError
from daunce_core.method.config import DaunceConfig
from daunce_core.method.draws import draw_perturbation
from daunce_core.method.objectives import per_example_objective
from daunce_core.method.signals import BaseSignals, compute_base_signals


@dataclass
class CopyLosses:
    """Loss rows of some perturbed copies.

    Attributes:
        ks: the copy indices, ``[G]``.
        train: losses on the training set, ``[G, n]`` float64 (rows of ``A``); NaN if diverged.
        query: measurements on the queries, ``[G, m]`` float64 (rows of ``B``); NaN if diverged.
        diverged: ``[G]`` bool.
    """

    ks: np.ndarray
    train: np.ndarray
    query: np.ndarray
    diverged: np.ndarray


class PerturbedCopies:
    """Trains and evaluates DAUNCE's perturbed copies of ``model``.

    Args:
        model: the trained base model ``θ0`` (not modified; a copy is cast to the run's dtype).
        task: the model protocol.
        train: training examples (``n`` rows), a mapping of column to tensor or array.
        queries: query examples (``m`` rows), same columns.
        config: the run's configuration.
        base_l2: the base model's own L2 strength; the default proximal λ.
        signals: base signals computed earlier (`daunce_core.method.signals.compute_base_signals` of
            the same model, data and objective); computed here when None.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train,
        queries,
        config: DaunceConfig,
        base_l2: float = 0.0,
        signals: BaseSignals | None = None,
    ) -> None:
        dtype = config.torch_dtype
        self.config, self.task = config, task
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.train = cast_floating(as_example_set(train, "train"), dtype)
        self.queries = cast_floating(as_example_set(queries, "queries"), dtype)
        self.names = trainable_names(self.model, task)
        self._probe()
        self.signals = None
        if config.objective.needs_base_signals:
            self.signals = signals or compute_base_signals(
                self.model, task, self.train, config.objective, config.eval_batch_size
            )
            self.signals = {k: v.to(dtype) for k, v in self.signals.items()}
        params = dict(self.model.named_parameters())
        self.anchor = {name: params[name].detach() for name in self.names}
        lam = base_l2 if config.prox is None else config.prox
        self.l2 = config.objective.gamma * lam

    def _probe(self) -> None:
        """Fail early, with the fix, if the model cannot run on the data or reduces losses."""
        check_compatible(self.train, self.queries)
        probe = take(self.train, slice(0, 2))
        try:
            with torch.no_grad():
                losses = self.task.per_example_loss(self.model, probe)
        except (RuntimeError, KeyError, IndexError, TypeError) as error:
            raise TaskError(
                f"the model could not compute losses on the first training examples "
                f"({type(error).__name__}: {error}); check that the model's input matches the "
                f"data columns {sorted(self.train)} and that the Task reads the right keys."
            ) from error
        check_per_example(losses, num_examples(probe), "Task.loss_from_outputs")

    @property
    def num_train(self) -> int:
        """n, the number of training examples."""
        return num_examples(self.train)

    @property
    def num_queries(self) -> int:
        """m, the number of queries."""
        return num_examples(self.queries)

    def draws(self, ks: Sequence[int]):
        """The perturbation draws of copies ``ks``."""
        c = self.config
        return [
            draw_perturbation(
                self.num_train,
                k,
                seed=c.seed,
                subset_ratio=c.subset_ratio,
                antithetic=c.antithetic,
            )
            for k in ks
        ]

    def _objective(self, outputs, batch, side):
        base = None if self.signals is None else {k: side[k] for k in self.signals}
        return per_example_objective(
            self.task, self.config.objective, outputs, batch, base, side["xi"]
        )

    def run(self, ks: Sequence[int]) -> CopyLosses:
        """Train copies ``ks`` (in groups of ``group_size``) and evaluate their losses."""
        parts = [
            self._run_group(list(ks[i : i + self.config.group_size]))
            for i in range(0, len(ks), self.config.group_size)
        ]
        result = CopyLosses(
            ks=np.concatenate([p.ks for p in parts]),
            train=np.concatenate([p.train for p in parts]),
            query=np.concatenate([p.query for p in parts]),
            diverged=np.concatenate([p.diverged for p in parts]),
        )
        if result.diverged.any():
            bad = result.ks[result.diverged].tolist()
            warnings.warn(
                f"perturbed copies {bad} diverged (non-finite objective, parameters or losses); "
                "their losses are NaN "
                "and the scores leave them out. Lower the learning rate or rho if this recurs.",
                DaunceWarning,
                stacklevel=2,
            )
        return result

    def _run_group(self, ks: list[int]) -> CopyLosses:
        return self.evaluate(ks, self.train_group(ks))

    def train_group(self, ks: Sequence[int]) -> TrainedCopies:
        """Train copies ``ks`` together (one group: ``vmap`` over all of them) from ``θ0``."""
        c = self.config
        return train_copies(
            self.model,
            self.task,
            self.train,
            self.draws(ks),
            self._objective,
            c.train,
            names=self.names,
            side=self.signals,
            l2=self.l2,
            anchor=self.anchor,
            seed=c.seed,
            vectorize=c.vectorize,
        )

    def evaluate(self, ks: Sequence[int], trained: TrainedCopies) -> CopyLosses:
        """Loss rows of trained copies ``ks``; non-finite rows are marked diverged and NaN."""
        train = self._measure(trained.params, self.train, "loss")
        query = self._measure(trained.params, self.queries, self.config.measurement)
        finite = np.isfinite(train).all(axis=1) & np.isfinite(query).all(axis=1)
        diverged = trained.diverged | ~finite
        train[diverged], query[diverged] = np.nan, np.nan
        return CopyLosses(np.asarray(ks), train, query, diverged)

    def measure_queries(self, params, start: int) -> np.ndarray:
        """Measurements of copies with ``params`` on queries ``start:`` only, ``[G, m − start]``.

        For queries added after the copies were trained: only loss evaluation, no training.
        """
        queries = take(self.queries, slice(start, self.num_queries))
        return self._measure(params, queries, self.config.measurement)

    def _measure(self, params, data, measurement) -> np.ndarray:
        values = evaluate_copies(
            self.model,
            self.task,
            params,
            data,
            measurement=measurement,
            batch_size=self.config.eval_batch_size,
            vectorize=self.config.vectorize,
        )
        return values.double().numpy()

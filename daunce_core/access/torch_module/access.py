"""The ``torch`` model access: perturbed copies of a torch module, trained at once (Alg. 1, 1–4).

`TorchModuleAccess` holds everything shared by the K copies — the base model in the run's dtype,
the data, the base signals — and produces the loss rows of any set of copy indices. Because each
copy depends only on ``(seed, k)``, rows can be computed in any grouping, on any worker, in any
order, and a missing row can be recomputed alone: this is what the pipeline maps over.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from daunce_core.access.base import Capabilities, CopyJournal, CopyLosses, ModelAccess
from daunce_core.access.task import Task, check_per_example
from daunce_core.access.torch_module.evaluation import evaluate_copies
from daunce_core.access.torch_module.stacked import trainable_names
from daunce_core.access.torch_module.subspace import (
    factor_shape,
    merge_trained,
    output_changes,
    parameter_gram,
    reflect,
    reflected_pass,
)
from daunce_core.access.torch_module.training import TrainedCopies, auto_lr, train_copies
from daunce_core.data import (
    as_example_set,
    batch_slices,
    cast_floating,
    check_compatible,
    num_examples,
    take,
)
from daunce_core.errors import DaunceWarning, TaskError
from daunce_core.method.config import ComputeConfig, DaunceConfig, TrainConfig
from daunce_core.method.draws import draw_perturbation
from daunce_core.method.objectives import per_example_objective
from daunce_core.method.signals import BaseSignals, compute_base_signals
from daunce_core.method.subspace import Reflections, SubspaceLosses, curvature_rows
from daunce_core.storage.files import save_tensors


class TorchModuleAccess(ModelAccess):
    """A torch ``nn.Module`` reached through a `Task`: copies trained at once with ``vmap``.

    The first `ModelAccess` kind: white-box, deterministic, every objective. Trained copies are
    `TrainedCopies` (stacked parameters ``name -> [G, ...]``), saved one safetensors file each.

    Args:
        model: the trained base model ``θ0`` (not modified; a copy is cast to the run's dtype).
        task: the model protocol.
        train: training examples (``n`` rows), a mapping of column to tensor or array.
        queries: query examples (``m`` rows), same columns.
        config: the run's configuration.
        base_l2: the base model's own L2 strength; the default proximal λ.
        signals: base signals computed earlier (`daunce_core.method.signals.compute_base_signals`
            of the same model, data and objective); computed here when None.
        compute: how copies are computed (group size, vectorisation, batch size, device).
    """

    kind = "torch"
    capabilities = Capabilities(
        gradients=True, fine_tuning=True, custom_objective=True, deterministic=True
    )

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train,
        queries,
        config: DaunceConfig,
        base_l2: float = 0.0,
        signals: BaseSignals | None = None,
        compute: ComputeConfig | None = None,
    ) -> None:
        self.check(config.objective)
        dtype = config.torch_dtype
        self.config, self.task = config, task
        self.compute = compute or ComputeConfig()
        device = self.compute.torch_device
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        self.train_set = _on(cast_floating(as_example_set(train, "train"), dtype), device)
        self.query_set = _on(cast_floating(as_example_set(queries, "queries"), dtype), device)
        self.names = trainable_names(self.model, task)
        self._probe()
        self.signals = None
        if config.objective.needs_base_signals:
            self.signals = signals or compute_base_signals(
                self.model, task, self.train_set, config.objective, self.compute.eval_batch_size
            )
            self.signals = {k: v.to(device=device, dtype=dtype) for k, v in self.signals.items()}
        params = dict(self.model.named_parameters())
        self.anchor = {name: params[name].detach() for name in self.names}
        self.prox = base_l2 if config.prox is None else config.prox
        self.l2 = config.objective.gamma * self.prox
        self._auto_lr: float | None = None

    def _probe(self) -> None:
        """Fail early, with the fix, if the model cannot run on the data or reduces losses."""
        check_compatible(self.train_set, self.query_set)
        probe = take(self.train_set, slice(0, 2))
        try:
            with torch.no_grad():
                losses = self.task.per_example_loss(self.model, probe)
        except (RuntimeError, KeyError, IndexError, TypeError) as error:
            raise TaskError(
                f"the model could not compute losses on the first training examples "
                f"({type(error).__name__}: {error}); check that the model's input matches the "
                f"data columns {sorted(self.train_set)} and that the Task reads the right keys."
            ) from error
        check_per_example(losses, num_examples(probe), "Task.loss_from_outputs")

    @property
    def num_train(self) -> int:
        """n, the number of training examples."""
        return num_examples(self.train_set)

    @property
    def num_queries(self) -> int:
        """m, the number of queries."""
        return num_examples(self.query_set)

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
        """Train copies ``ks`` (in groups of ``compute.group_size``) and evaluate their losses."""
        size = self.compute.group_size
        parts = [
            self.evaluate(list(ks[i : i + size]), self.train(list(ks[i : i + size])))
            for i in range(0, len(ks), size)
        ]
        result = CopyLosses(
            ks=np.concatenate([p.ks for p in parts]),
            train=np.concatenate([p.train for p in parts]),
            query=np.concatenate([p.query for p in parts]),
            diverged=np.concatenate([p.diverged for p in parts]),
        )
        _warn_diverged(result)
        return result

    def run_subspace(self, ks: Sequence[int]) -> tuple[CopyLosses, SubspaceLosses]:
        """Train copies ``ks`` (in groups) and measure what the subspace scores need.

        Every copy ``θ0 + Δ_k``, its reflection ``θ0 − Δ_k`` (no training) and ``θ0`` are
        measured on the training set and the queries, and ``Q = (1/n) Σ_i dz_ikᵀ H_i dz_il +
        λ Δ_kᵀ Δ_l`` is formed over all copies at once (`daunce_core.method.subspace`), ``λ``
        the copies' proximal strength (``prox``, default the base model's L2). All K copies'
        parameters are held together (``K × P`` values). The loss rows are the trained copies'
        (as `run`'s); a copy is diverged if any of its measurements is not finite.
        """
        size = self.compute.group_size
        trained = merge_trained(
            [self.train(list(ks[i : i + size])) for i in range(0, len(ks), size)]
        )
        parts = self.measure_reflected(trained)
        diverged = np.asarray(trained.diverged) | ~parts.finite_rows()
        train, query = parts.train.plus.copy(), parts.query.plus.copy()
        train[diverged], query[diverged] = np.nan, np.nan
        rows = CopyLosses(np.asarray(ks), train, query, diverged)
        _warn_diverged(rows)
        return rows, parts

    def measure_reflected(self, trained: TrainedCopies) -> SubspaceLosses:
        """Measurements of ``trained``, of their reflections and of ``θ0``, and ``Q``.

        One pass over each split (`reflected_pass`): the training set's also gives ``Q``'s
        output part on the curvature examples (`curvature_rows`).
        """
        options = {
            "batch_size": self._rows_per_pass(),
            "group_size": self.compute.group_size,
            "vectorize": self._vectorize_evaluation(),
        }
        params, model, task = trained.params, self.model, self.task
        train, gram = reflected_pass(
            model, task, params, self.anchor, self.train_set, curvature=self.curvature_rows(),
            **options,
        )  # fmt: skip
        query, _ = reflected_pass(
            model, task, params, self.anchor, self.query_set,
            measurement=self.config.measurement, **options,
        )  # fmt: skip
        return SubspaceLosses(
            train=train,
            query=query,
            curvature=gram + self.prox * parameter_gram(params, self.anchor),
        )

    def prepare_reflections(self, path: Path, queries_key: str) -> None:
        """Nothing to make once per run: the reflections are measured from each copy alone.

        (The kinds whose copies cannot be reflected make their curvature probes here:
        `daunce_core.access.api.access.APIAccess.prepare_reflections`.)
        """
        return None

    def measure_reflections(
        self, trained: TrainedCopies, losses: CopyLosses | None = None
    ) -> Reflections:
        """What the pipeline stores per copy for the subspace scores (no training).

        The reflected copies' measurements on the training set and the queries, and each
        copy's curvature factors on the curvature examples (`curvature_rows`,
        `daunce_core.access.torch_module.subspace.output_changes`), from which ``Q``'s output
        part is formed across copies measured apart. ``losses`` (the copies' own rows) are not
        needed: the reflections are evaluated.
        """
        params = trained.params
        rows = torch.from_numpy(self.curvature_rows()).to(self._device)
        changes, curved = [], []
        for batch in batch_slices(len(rows), self._rows_per_pass()):
            left, right = output_changes(
                self.model,
                self.task,
                params,
                self.anchor,
                take(self.train_set, rows[batch]),
                group_size=self.compute.group_size,
                vectorize=self._vectorize_evaluation(),
            )
            changes.append(left.float().cpu().numpy())
            curved.append(right.float().cpu().numpy())
        mirrored = reflect(params, self.anchor)
        return Reflections(
            train=self._measure(mirrored, self.train_set, "loss"),
            query=self._measure(mirrored, self.query_set, self.config.measurement),
            changes=np.concatenate(changes, axis=1),
            curved=np.concatenate(curved, axis=1),
        )

    def changes_shape(self) -> tuple[int, ...]:
        """The shape of one copy's stored curvature factors: ``(n_c, factor of one example...)``."""
        return (len(self.curvature_rows()), *self._factor_shape())

    def curvature_rows(self) -> np.ndarray:
        """The training examples ``Q``'s output part averages over (`curvature_rows`)."""
        size = sum(value.numel() for value in self.anchor.values())
        return curvature_rows(self.num_train, int(np.prod(self._factor_shape())), budget=size)

    def _factor_shape(self) -> tuple[int, ...]:
        if getattr(self, "_factors", None) is None:
            self._factors = factor_shape(self.model, self.task, self.train_set)
        return self._factors

    def _rows_per_pass(self) -> int:
        """Examples per evaluation forward pass (``compute.eval_batch_size``)."""
        return self.compute.eval_batch_size

    def _vectorize_evaluation(self) -> bool:
        """Whether copies are evaluated together under ``vmap`` (``compute.vectorize``)."""
        return self.compute.vectorize

    @property
    def _device(self) -> torch.device:
        return next(iter(self.anchor.values())).device

    def train(self, ks: Sequence[int], journal: CopyJournal | None = None) -> TrainedCopies:
        """Train copies ``ks`` together (one group: ``vmap`` over all of them) from ``θ0``.

        A copy's result does not depend on which other copies share its group. No external
        jobs: ``journal`` is not used.
        """
        c = self.config
        return train_copies(
            self.model,
            self.task,
            self.train_set,
            self.draws(ks),
            self._objective,
            self.recipe(),
            names=self.names,
            side=self.signals,
            l2=self.l2,
            anchor=self.anchor,
            seed=c.seed,
            vectorize=self._vectorize_training(),
        )

    def recipe(self) -> TrainConfig:
        """The copies' `TrainConfig`, with ``lr: auto`` resolved once for the whole run."""
        train = self.config.train
        if train.lr != "auto":
            return train
        if self._auto_lr is None:
            self._auto_lr = auto_lr(
                self.model,
                self.task,
                self.train_set,
                self.draws([0])[0],
                self._objective,
                train,
                self.names,
                side=self.signals,
                l2=self.l2,
                anchor=self.anchor,
                seed=self.config.seed,
            )
        return dataclasses.replace(train, lr=self._auto_lr)

    def training_summary(self, trained: TrainedCopies, g: int) -> dict | None:
        """Copy ``g``'s learning rate, steps, residual and convergence (`TrainedCopies.summary`)."""
        return trained.summary(g, self.config.train.tolerance)

    def _vectorize_training(self) -> bool:
        """Whether a group trains under ``vmap`` (``compute.vectorize``)."""
        return self.compute.vectorize

    def copy_key(self, name: str) -> str:
        """The key of trainable parameter ``name`` in a saved copy (the name itself)."""
        return name

    def evaluate(self, ks: Sequence[int], trained: TrainedCopies) -> CopyLosses:
        """Loss rows of trained copies ``ks``; non-finite rows are marked diverged and NaN."""
        train = self._measure(trained.params, self.train_set, "loss")
        query = self._measure(trained.params, self.query_set, self.config.measurement)
        finite = np.isfinite(train).all(axis=1) & np.isfinite(query).all(axis=1)
        diverged = np.asarray(trained.diverged) | ~finite
        self._warn_far(ks, train, diverged, trained.lr)
        train[diverged], query[diverged] = np.nan, np.nan
        return CopyLosses(np.asarray(ks), train, query, diverged)

    def _warn_far(self, ks, train: np.ndarray, diverged: np.ndarray, lr) -> None:
        """Warn about copies whose mean training loss ends far above θ0's (finite, not diverged).

        A perturbed copy moves about ρ/γ times the linear response: its mean loss stays near
        θ0's. One that ends above ``2 × θ0's + 1`` took steps too large for the objective (a
        fixed lr far above the curvature's), and its losses say little about θ0.
        """
        if self.signals is None or "value" not in self.signals or self.config.objective.uses_margin:
            return
        base = float(self.signals["value"].double().mean())
        means = np.where(diverged, -np.inf, train.mean(axis=1))
        far = np.flatnonzero(means > 2 * base + 1)
        if len(far):
            warnings.warn(
                f"perturbed copies {np.asarray(ks)[far].tolist()} end with a mean training loss "
                f"up to {means[far].max():.3g}, against θ0's {base:.3g} (lr {lr:.3g}): their "
                "steps were too large for the objective, and their losses say little about θ0. "
                "Use train.lr: auto (the step from the objective's curvature) or a smaller lr.",
                DaunceWarning,
                stacklevel=3,
            )

    def measure_queries(self, trained: TrainedCopies, start: int) -> np.ndarray:
        """Measurements of trained copies on queries ``start:`` only, ``[G, m − start]``.

        For queries added after the copies were trained: only loss evaluation, no training.
        """
        queries = take(self.query_set, slice(start, self.num_queries))
        return self._measure(trained.params, queries, self.config.measurement)

    def save_copy(self, trained: TrainedCopies, g: int, path: Path) -> None:
        """Write copy ``g``'s parameters to ``path`` (safetensors, renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        tensors = {
            self.copy_key(name): p[g].detach().cpu().contiguous()
            for name, p in trained.params.items()
        }
        save_tensors(tensors, partial)
        partial.replace(path)

    def load_copies(self, paths: Sequence[Path]) -> TrainedCopies:
        """Copies saved by `save_copy`, stacked in order (none diverged)."""
        device = self.compute.torch_device
        files = [load_file(str(path)) for path in paths]
        params = {
            name: torch.stack([f[self.copy_key(name)] for f in files]).to(device)
            for name in self.names
        }
        count = len(files)
        return TrainedCopies(
            params=params,
            diverged=np.zeros(count, dtype=bool),
            steps=0,
            final_objective=np.full(count, np.nan),
        )

    def _measure(self, params, data, measurement) -> np.ndarray:
        values = evaluate_copies(
            self.model,
            self.task,
            params,
            data,
            measurement=measurement,
            batch_size=self._rows_per_pass(),
            vectorize=self._vectorize_evaluation(),
        )
        return values.double().cpu().numpy()


def _warn_diverged(rows: CopyLosses) -> None:
    if rows.diverged.any():
        bad = rows.ks[rows.diverged].tolist()
        warnings.warn(
            f"perturbed copies {bad} diverged (non-finite objective, parameters or losses); "
            "their losses are NaN "
            "and the scores leave them out. Lower the learning rate or rho if this recurs.",
            DaunceWarning,
            stacklevel=3,
        )


def _on(examples: dict, device: torch.device) -> dict:
    """An example set with every tensor on ``device``."""
    return {name: value.to(device) for name, value in examples.items()}

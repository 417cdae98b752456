"""Training many copies of a model at once: SGD with momentum or AdamW, cosine schedule.

One trainer serves every training DAUNCE needs: the K perturbed copies (Algorithm 1, line 4),
the base model, and (later) the ground-truth retrainings of the evaluation. Each copy visits its
own subset of the examples in its own order; all copies of a group take their steps in lockstep,
vectorised over copies (`daunce_core.access.torch_module.stacked`). A copy whose objective becomes
non-finite is
marked diverged (reported by index), frozen, and left for the caller to exclude — it never
touches the other copies, whose parameter slices are independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from daunce_core.access.torch_module.stacked import (
    Stacked,
    copy_outputs_fn,
    map_copies,
    stack_copies,
    trainable_names,
)
from daunce_core.data import ExampleSet, num_examples, take
from daunce_core.errors import DaunceError
from daunce_core.method.config import TrainConfig
from daunce_core.method.draws import PerturbationDraw, draw_perturbation, epoch_order

ExampleObjective = Callable[[torch.Tensor, ExampleSet, dict], torch.Tensor]
"""``(outputs [B, ...], batch, side) -> per-example objective [B]`` of one copy."""

StepCallback = Callable[[int, Stacked, float], None]
"""``(steps_done, params, lr)``, called after every optimiser step: ``params`` the live stacked
parameters (``name -> [G, ...]``; clone what you keep), ``lr`` the learning rate the step used."""


@dataclass
class TrainedCopies:
    """Result of `train_copies`.

    Attributes:
        params: trained parameters, ``name -> [G, ...]``.
        diverged: ``[G]`` bool, True where the objective became non-finite.
        steps: optimiser steps taken.
        final_objective: ``[G]`` objective of each copy's last batch (NaN where diverged).
    """

    params: Stacked
    diverged: np.ndarray
    steps: int
    final_objective: np.ndarray


def _optimizer(params: list[torch.Tensor], config: TrainConfig, total: int):
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
    if config.schedule == "constant":
        return opt, None

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)


class _BatchPlan:
    """Which examples each copy sees at each step: its subset, reshuffled every epoch."""

    def __init__(self, draws: list[PerturbationDraw], batch_size: int, seed: int) -> None:
        sizes = {len(d.subset) for d in draws}
        if len(sizes) != 1:
            raise DaunceError(f"copies trained together need equal subset sizes; got {sizes}.")
        self.draws, self.batch_size, self.seed = draws, batch_size, seed
        self.size = sizes.pop()
        self.per_epoch = math.ceil(self.size / batch_size)
        self._epoch, self._orders = -1, None

    def rows(self, step: int) -> torch.Tensor:
        """Example indices ``[G, B]`` for ``step``."""
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            orders = [epoch_order(d, epoch, self.seed) for d in self.draws]
            self._epoch, self._orders = epoch, torch.from_numpy(np.stack(orders))
        start = position * self.batch_size
        return self._orders[:, start : start + self.batch_size]


def _penalty(params: Stacked, l2: float, anchor: dict[str, torch.Tensor] | None) -> torch.Tensor:
    total = 0.0
    for name, p in params.items():
        diff = p if anchor is None else p - anchor[name]
        total = total + diff.pow(2).reshape(p.shape[0], -1).sum(dim=1)
    return 0.5 * l2 * total


def train_copies(
    model: nn.Module,
    task,
    data: ExampleSet,
    draws: list[PerturbationDraw],
    objective: ExampleObjective,
    config: TrainConfig,
    *,
    names: list[str],
    side: dict[str, torch.Tensor] | None = None,
    l2: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    init: Stacked | None = None,
    seed: int = 0,
    vectorize: bool = True,
    on_step: StepCallback | None = None,
) -> TrainedCopies:
    """Train ``G = len(draws)`` copies of ``model``, copy ``g`` on ``draws[g].subset``.

    Each copy minimises ``mean_{i ∈ batch} objective_i + ½·l2·‖θ − anchor‖²``.

    Args:
        model: the model; its current parameters are the starting point unless ``init`` is set.
        task: the model protocol (`daunce_core.access.task.Task`).
        data: all examples, ``n`` rows; batches are gathered by index.
        draws: one draw per copy (subset and ξ); the visiting order follows ``(seed, k)``.
        objective: per-example objective of one copy, see `ExampleObjective`.
        config: optimiser, schedule, length and batch size.
        names: trainable parameter names
        (`daunce_core.access.torch_module.stacked.trainable_names`).
        side: extra per-example tensors gathered with the batch: ``[n, ...]`` shared by all
            copies, and ``"xi"`` taken per copy from the draws.
        l2: weight of the quadratic penalty (0 disables it).
        anchor: centre of the penalty (``θ0`` for a proximal term); None means zero.
        init: starting parameters ``[G, ...]`` (default: the model's, for every copy).
        seed: seed of the visiting order.
        vectorize: train the copies at once with ``vmap`` (True) or one after another.
        on_step: optional `StepCallback` after every step (e.g. to keep checkpoints).
    """
    params = init if init is not None else stack_copies(model, names, len(draws))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    plan = _BatchPlan(draws, config.batch_size, seed)
    total = config.total_steps(plan.size)
    opt, schedule = _optimizer(list(params.values()), config, total)
    device = next(iter(params.values())).device  # the draws follow the parameters (a GPU)
    xi_all = torch.from_numpy(np.stack([d.xi for d in draws])).to(device)
    copies = torch.arange(len(draws), device=device).unsqueeze(1)
    step_fn = _copy_objective_fn(model, task, objective)
    diverged = torch.zeros(len(draws), dtype=torch.bool, device=device)
    last = torch.full((len(draws),), float("nan"), dtype=torch.float64, device=device)
    for step in range(total):
        rows = plan.rows(step)
        batch = take(data, rows)
        extra = {k: v[rows] for k, v in (side or {}).items()}
        extra["xi"] = xi_all[copies, rows.to(device)]  # [G, B] or [G, B, tokens]
        values = map_copies(step_fn, (params, batch, extra), vectorize)
        values = values + _penalty(params, l2, anchor) if l2 else values
        diverged |= ~torch.isfinite(values.detach())
        opt.zero_grad(set_to_none=False)
        torch.where(diverged, torch.zeros_like(values), values).sum().backward()
        _freeze(params, diverged)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        if schedule is not None:
            schedule.step()
        last = values.detach().double()
        if on_step is not None:
            on_step(step + 1, params, lr)
    diverged |= ~_finite_copies(params)
    return TrainedCopies(
        params={k: v.detach() for k, v in params.items()},
        diverged=diverged.cpu().numpy(),
        steps=total,
        final_objective=torch.where(diverged, float("nan"), last).cpu().numpy(),
    )


def _copy_objective_fn(model: nn.Module, task, objective: ExampleObjective) -> Callable:
    outputs_of = copy_outputs_fn(model, task)

    def copy_objective(params, batch, side) -> torch.Tensor:
        return objective(outputs_of(params, batch), batch, side).mean()

    return copy_objective


def _finite_copies(params: Stacked) -> torch.Tensor:
    """``[G]`` True where every parameter of the copy is finite."""
    flags = [torch.isfinite(p.detach().reshape(p.shape[0], -1)).all(dim=1) for p in params.values()]
    return torch.stack(flags).all(dim=0)


def _freeze(params: Stacked, diverged: torch.Tensor) -> None:
    """Zero the gradients of diverged copies so they stop moving (and stay out of the others)."""
    if bool(diverged.any()):
        for p in params.values():
            p.grad[diverged] = 0.0


def fit(
    model: nn.Module,
    task,
    data: ExampleSet,
    config: TrainConfig,
    *,
    l2: float = 0.0,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> nn.Module:
    """Train ``model`` in place by empirical risk minimisation: mean loss + ``½·l2·‖θ‖²``.

    The base model of a run, trained with the same trainer as the perturbed copies; ``l2`` is its
    regularisation strength, which DAUNCE's proximal term reuses by default. ``on_step`` (a
    `StepCallback`, params ``[1, ...]``) sees every step, e.g. to keep checkpoints for TracIn.
    """
    names = trainable_names(model, task)
    draw = draw_perturbation(num_examples(data), 0, seed=seed, subset_ratio=1.0)
    model.train()
    result = train_copies(
        model,
        task,
        data,
        [draw],
        lambda out, batch, side: task.loss_from_outputs(out, batch),
        config,
        names=names,
        l2=l2,
        seed=seed,
        vectorize=False,
        on_step=on_step,
    )
    if result.diverged[0]:
        raise DaunceError("training diverged (non-finite loss); lower the learning rate.")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in result.params:
                p.copy_(result.params[name][0])
    return model.eval()

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
        steps: optimiser steps taken (by the group; a converged copy stops earlier).
        final_objective: ``[G]`` objective of each copy's last batch (NaN where diverged).
        lr: the peak learning rate used (``TrainConfig.lr``, or its value under ``"auto"``).
        residual: ``[G]`` each copy's last measured ``‖∇F_k(θ)‖ / ‖∇F_k(θ0)‖`` (see
            ``TrainConfig.tolerance``), or None when no tolerance was set.
        copy_steps: ``[G]`` steps each copy took, or None when no tolerance was set.
        judged: False when training ended before a whole epoch: the residual then comes from
            part of the subset and no copy counts as converged.
    """

    params: Stacked
    diverged: np.ndarray
    steps: int
    final_objective: np.ndarray
    lr: float | None = None
    residual: np.ndarray | None = None
    copy_steps: np.ndarray | None = None
    judged: bool = True

    def converged(self, tolerance: float | None) -> np.ndarray | None:
        """``[G]`` whether each copy's residual reached ``tolerance`` (None if not measured)."""
        if tolerance is None or self.residual is None:
            return None
        return (self.residual <= tolerance) & self.judged

    def summary(self, g: int, tolerance: float | None) -> dict:
        """What copy ``g``'s training did, for its record: lr, steps, residual, converged."""
        out: dict = {"lr": self.lr, "steps": self.steps}
        if self.residual is not None:
            residual = float(self.residual[g])
            out |= {
                "steps": int(self.copy_steps[g]),
                "residual": residual if math.isfinite(residual) else None,
                "converged": bool(self.converged(tolerance)[g]) if tolerance is not None else None,
            }
        return out


def _optimizer(params: list[torch.Tensor], config: TrainConfig, total: int, lr: float):
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)
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
    step_fn = _copy_objective_fn(model, task, objective)
    lr = config.lr
    if lr == "auto":
        lr = auto_lr(
            model,
            task,
            data,
            draws[0],
            objective,
            config,
            names,
            side=side,
            l2=l2,
            anchor=anchor,
            seed=seed,
        )
    opt, schedule = _optimizer(list(params.values()), config, total, lr)
    device = next(iter(params.values())).device  # the draws follow the parameters (a GPU)
    xi_all = torch.from_numpy(np.stack([d.xi for d in draws])).to(device)
    copies = torch.arange(len(draws), device=device).unsqueeze(1)

    def objective_values(step: int) -> torch.Tensor:
        rows = plan.rows(step)
        extra = {k: v[rows] for k, v in (side or {}).items()}
        extra["xi"] = xi_all[copies, rows.to(device)]  # [G, B] or [G, B, tokens]
        values = map_copies(step_fn, (params, take(data, rows), extra), vectorize)
        return values + _penalty(params, l2, anchor) if l2 else values

    watch = _Convergence(params, plan, config.tolerance, objective_values)
    diverged = torch.zeros(len(draws), dtype=torch.bool, device=device)
    last = torch.full((len(draws),), float("nan"), dtype=torch.float64, device=device)
    steps = 0
    for step in range(total):
        values = objective_values(step)
        diverged |= ~torch.isfinite(values.detach())
        opt.zero_grad(set_to_none=False)
        torch.where(diverged, torch.zeros_like(values), values).sum().backward()
        _freeze(params, diverged | watch.stopped)
        watch.add(params)
        lr_used = opt.param_groups[0]["lr"]
        opt.step()
        if schedule is not None:
            schedule.step()
        watch.hold(params)
        last = torch.where(watch.stopped, last, values.detach().double())
        steps = step + 1
        if on_step is not None:
            on_step(steps, params, lr_used)
        if watch.check(steps, params, diverged):
            break
    watch.finish(steps)
    diverged |= ~_finite_copies(params)
    return TrainedCopies(
        params={k: v.detach() for k, v in params.items()},
        diverged=diverged.cpu().numpy(),
        steps=steps,
        final_objective=torch.where(diverged, float("nan"), last).cpu().numpy(),
        lr=float(lr),
        residual=watch.residual_array(),
        copy_steps=watch.steps_array(),
        judged=watch.tolerance is None or watch.judged,
    )


def auto_lr(
    model: nn.Module,
    task,
    data: ExampleSet,
    draw: PerturbationDraw,
    objective: ExampleObjective,
    config: TrainConfig,
    names: list[str],
    *,
    side: dict[str, torch.Tensor] | None = None,
    l2: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> float:
    """``lr: auto``'s value, ``(1 − momentum) / L`` (`largest_curvature`).

    The same for every copy and group of a run: compute it once and reuse it.
    """
    step_fn = _copy_objective_fn(model, task, objective)
    curvature = largest_curvature(
        step_fn, model, data, draw, names, side=side, l2=l2, anchor=anchor, seed=seed
    )
    return (1.0 - config.momentum) / curvature


def largest_curvature(
    step_fn: Callable,
    model: nn.Module,
    data: ExampleSet,
    draw: PerturbationDraw,
    names: list[str],
    *,
    side: dict[str, torch.Tensor] | None = None,
    l2: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    examples: int = 512,
    iterations: int = 30,
    rtol: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """``L``, the largest curvature (absolute eigenvalue) of one copy's objective at ``θ0``.

    Lanczos on Hessian-vector products of ``mean objective + ½·l2·‖θ − anchor‖²`` over
    ``examples`` training examples drawn with ``seed`` (the same for every copy and group),
    until the largest Ritz value changes by less than ``rtol`` (at most ``iterations``), with
    every ``ξ`` at its median 0.5 (no perturbation: ``σ = 0``, zero Gaussian noise): the
    perturbation's terms are linear in the logits and add no curvature at ``θ0``. A product is
    a central difference of gradients, ``(∇F(θ0 + εv) − ∇F(θ0 − εv)) / 2ε`` with
    ``ε‖v‖ = 1e-3·max(‖θ0‖, 1)``: first derivatives only, so any model the trainer can train
    works (also attention kernels without double backward). ``draw`` gives the shape of ``ξ``
    (per example or per token).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    n = num_examples(data)
    rows = torch.randperm(n, generator=generator)[: min(examples, n)].to(device)
    xi = torch.full_like(torch.from_numpy(np.asarray(draw.xi[0])), 0.5).to(device)
    current = dict(model.named_parameters())
    theta0 = {name: current[name].detach() for name in names}

    def gradient(point: Stacked) -> list[torch.Tensor]:
        point = {k: v.detach().requires_grad_(True) for k, v in point.items()}
        total = [torch.zeros_like(v) for v in point.values()]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            extra = {k: v[chunk] for k, v in (side or {}).items()}
            extra["xi"] = xi.expand(len(chunk), *xi.shape)
            value = step_fn(point, take(data, chunk), extra) * (len(chunk) / len(rows))
            for acc, grad in zip(
                total, torch.autograd.grad(value, list(point.values())), strict=True
            ):
                acc += grad
        if l2:
            for acc, (k, v) in zip(total, point.items(), strict=True):
                acc += l2 * (v.detach() - (0 if anchor is None else anchor[k]))
        return total

    shapes = [v.shape for v in theta0.values()]
    flat0 = torch.cat([v.reshape(-1) for v in theta0.values()])
    scale = 1e-3 * max(float(flat0.norm()), 1.0)

    def product(vector: torch.Tensor) -> torch.Tensor:
        """``H v`` by a central difference of gradients (``v`` of unit norm)."""

        def point(sign: float) -> Stacked:
            moved = flat0 + sign * scale * vector
            parts = torch.split(moved, [math.prod(shape) for shape in shapes])
            return {k: p.reshape(shape) for k, p, shape in zip(theta0, parts, shapes, strict=True)}

        plus, minus = gradient(point(1.0)), gradient(point(-1.0))
        return torch.cat([(a - b).reshape(-1) for a, b in zip(plus, minus, strict=True)]) / (
            2 * scale
        )

    estimate = _lanczos_largest(product, flat0, generator, iterations, rtol)
    if not (math.isfinite(estimate) and abs(estimate) > 0):
        raise DaunceError(
            f"lr 'auto' found no usable curvature of the copies' objective at θ0 (largest "
            f"eigenvalue estimate {estimate}); give train.lr as a number."
        )
    return abs(estimate)


def _lanczos_largest(product, like: torch.Tensor, generator, iterations: int, rtol: float):
    """The largest-magnitude Ritz value of the symmetric operator ``product`` (Lanczos).

    Full reorthogonalisation; stops when the Ritz value moves by less than ``rtol`` between
    steps, after at most ``iterations`` products, or when the Krylov space is exhausted.
    Converges much faster than the power iteration for the extreme eigenvalue.
    """
    basis = [torch.randn(like.shape, generator=generator).to(like)]
    basis[0] = basis[0] / basis[0].norm()
    alphas, betas, estimate = [], [], float("nan")
    for _ in range(iterations):
        w = product(basis[-1])
        alphas.append(float(basis[-1] @ w))
        for q in basis:  # full reorthogonalisation, twice is enough
            w = w - (q @ w) * q
        for q in basis:
            w = w - (q @ w) * q
        tri = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        values = np.linalg.eigvalsh(tri)
        previous, estimate = estimate, float(values[np.argmax(np.abs(values))])
        norm = float(w.norm())
        if abs(estimate - previous) <= rtol * abs(estimate) or norm <= 1e-12 * abs(estimate):
            break
        betas.append(norm)
        basis.append(w / norm)
    return estimate


class _Convergence:
    """Each copy's relative gradient residual, checked after every epoch (``tolerance``).

    The reference ``‖∇F_k(θ0)‖`` comes from one pass over the copy's first-epoch batches at
    ``θ0`` before training; during training each copy's mini-batch gradients are summed over
    the epoch (its subset visited once). A copy whose residual reaches ``tolerance`` stops: its
    gradients are zeroed and its parameters held where they were (momentum and decay cannot
    move it), so a copy's result never depends on the copies sharing its group.
    """

    def __init__(self, params: Stacked, plan: _BatchPlan, tolerance, objective_values) -> None:
        self.tolerance, self.per_epoch = tolerance, plan.per_epoch
        first = next(iter(params.values()))
        self.stopped = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        if tolerance is None:
            return
        self.sums = {k: torch.zeros_like(v) for k, v in params.items()}
        self.held = {k: v.detach().clone() for k, v in params.items()}
        self.count = 0
        for step in range(self.per_epoch):
            grads = torch.autograd.grad(objective_values(step).sum(), list(params.values()))
            for acc, grad in zip(self.sums.values(), grads, strict=True):
                acc += grad
        self.reference = self._norms(self.per_epoch)
        self._reset()
        self.residual = torch.full_like(self.reference, float("nan"))
        self.copy_steps = torch.zeros_like(self.reference, dtype=torch.long)
        self.judged = True

    def _norms(self, count: int) -> torch.Tensor:
        squares = sum(
            (s / count).pow(2).reshape(s.shape[0], -1).sum(dim=1) for s in self.sums.values()
        )
        return squares.double().sqrt()

    def _reset(self) -> None:
        for s in self.sums.values():
            s.zero_()
        self.count = 0

    def add(self, params: Stacked) -> None:
        """Add this step's gradients (after diverged and stopped copies' were zeroed)."""
        if self.tolerance is not None:
            for acc, p in zip(self.sums.values(), params.values(), strict=True):
                acc += p.grad
            self.count += 1

    def hold(self, params: Stacked) -> None:
        """Put stopped copies back where they stopped."""
        if self.tolerance is not None and bool(self.stopped.any()):
            with torch.no_grad():
                mask = self.stopped
                for name, p in params.items():
                    shape = (-1,) + (1,) * (p.dim() - 1)
                    p.copy_(torch.where(mask.view(shape), self.held[name], p))

    def _measure(self, steps: int) -> None:
        active = ~self.stopped
        ratio = self._norms(self.count) / self.reference
        self.residual = torch.where(active, ratio, self.residual)
        done = torch.full_like(self.copy_steps, steps)
        self.copy_steps = torch.where(active, done, self.copy_steps)

    def check(self, steps: int, params: Stacked, diverged: torch.Tensor) -> bool:
        """After ``steps``: at an epoch's end, stop the copies that converged; True if all did."""
        if self.tolerance is None or steps % self.per_epoch:
            return False
        self._measure(steps)
        newly = (self.residual <= self.tolerance) & ~self.stopped & ~diverged
        if bool(newly.any()):
            with torch.no_grad():
                for name, held in self.held.items():
                    held[newly] = params[name][newly]
            self.stopped |= newly
        self._reset()
        return bool((self.stopped | diverged).all())

    def finish(self, steps: int) -> None:
        """After the last step: every copy's steps; a residual if no epoch ended.

        Steps after the last epoch's end (a ``steps`` or ``epochs`` that is not a whole number
        of epochs) count in each copy's steps, but its residual stays the last whole epoch's,
        which visited the whole subset. With no whole epoch, the partial epoch's residual is
        kept but judges nothing (`judged` False: not converged).
        """
        if self.tolerance is None or not self.count:
            return
        if bool((self.copy_steps == 0).all()):
            self._measure(steps)
            self.judged = False
            return
        active = ~self.stopped
        done = torch.full_like(self.copy_steps, steps)
        self.copy_steps = torch.where(active, done, self.copy_steps)

    def residual_array(self) -> np.ndarray | None:
        return None if self.tolerance is None else self.residual.cpu().numpy()

    def steps_array(self) -> np.ndarray | None:
        return None if self.tolerance is None else self.copy_steps.cpu().numpy()


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

"""Exact influence quantities for small models: the closed forms DAUNCE is tested against.

For a model with ``P`` trainable parameters (small: the matrices are ``P × P``), at ``θ0``:

* ``G`` — per-example gradients ``∇L_i`` (train) and ``∇M_j`` of the query measurement, ``[n, P]``;
* ``H`` — Hessian of the mean training loss, plus ``λI`` (the base model's L2);
* ``F = (1/n) Σ ∇L_i ∇L_iᵀ`` — the empirical Fisher; ``Φ`` — the same with margin gradients;
* ``GN = (1/n) Σ J_iᵀ Λ_i J_i`` — the Gauss-Newton matrix (``J_i = ∂g_i/∂θ``, ``Λ_i`` the output
  Hessian of the loss).

The influence function (paper eq. (1)) is ``(1/n) ∇L_iᵀ H⁻¹ ∇M_j``. DAUNCE's covariance converges
(first order, DESIGN §1) to ``(ρ/γ)²/s · ∇L_iᵀ C⁻¹ N C⁻¹ ∇M_j`` with ``s = r·n`` the subset size,
``C`` the objective's curvature and ``N`` the covariance of the perturbation in parameter space:

=========  ===========  ================  ===============
variant    labels       curvature ``C``   noise ``N``
=========  ===========  ================  ===============
hessian    observed     ``H + λ``         ``F / 3``
hessian    sampled      ``H + λ``         ``GN``
efim       observed     ``F + λ``         ``F / 3``
efim       sampled      ``F + λ``         ``GN``
trak       observed     ``Φ + λ``         ``Φ / 3``
trak       sampled      ``Φ + λ``         ``GN``
=========  ===========  ================  ===============

(``1/3`` is the variance of ``σ = 2ξ − 1``.) The limits hold in the linear-response regime:
small ``ρ/γ`` and copies trained to their perturbed optimum. ``efim`` with sampled labels needs
the smallest ``ρ``: its curvature weighs examples by their residuals while the sampled noise does
not, so the quartic terms of ``½(L − L0)²`` show up sooner (on least squares: slope 0.7 at
``ρ = 0.1``, 1.0 at ``ρ = 0.01``; ``bench/bench_convergence.py``).

With ``GN = H`` — a generalised linear model with its canonical loss and no L2 — the
sampled-label ``hessian`` limit is the influence function itself; the paper's observed-label
limit is the sandwich ``H⁻¹ F H⁻¹``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from daunce_core.access.task import Measurement, Task, TaskModule
from daunce_core.access.torch_module.stacked import trainable_names
from daunce_core.data import ExampleSet, batch_slices, num_examples, take
from daunce_core.errors import DaunceError


class FlatModel:
    """A model's trainable parameters as one flat vector ``θ`` (``[P]``), and functions of it."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        self.model, self.task = model, task
        self.names = trainable_names(model, task)
        params = dict(model.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[P]`` vector into named parameter tensors."""
        sizes = [s.numel() for s in self.shapes]
        parts = torch.split(theta, sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def outputs(self, theta: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Logits of the model at ``theta`` on ``batch``."""
        swap = self.unflatten(theta)
        return functional_call(
            TaskModule(self.model, self.task), {f"m.{k}": v for k, v in swap.items()}, (batch,)
        )


def _single(batch: ExampleSet) -> ExampleSet:
    return {k: v.unsqueeze(0) for k, v in batch.items()}


def per_example_gradients(
    flat: FlatModel, data: ExampleSet, value: Callable[[torch.Tensor, ExampleSet], torch.Tensor]
) -> torch.Tensor:
    """``∇_θ value_i`` at ``flat.theta`` for every example, ``[n, P]``.

    ``value(outputs, batch)`` returns one value per example (a loss, margin or measurement).
    """

    def one(theta, example):
        batch = _single(example)
        return value(flat.outputs(theta, batch), batch)[0]

    return vmap(grad(one), in_dims=(None, 0))(flat.theta, dict(data))


def measurement_fn(task: Task, measurement: Measurement) -> Callable:
    """``(outputs, batch) -> [B]`` query measurement (loss, or negated margin)."""
    return lambda outputs, batch: task.measure(outputs, batch, measurement)


def loss_hessian(flat: FlatModel, data: ExampleSet, chunk_size: int = 256) -> torch.Tensor:
    """Hessian of the mean training loss at ``flat.theta``, ``[P, P]`` (no L2).

    Summed over chunks of ``chunk_size`` examples: the Hessian of one pass over all examples holds
    ``P`` copies of every activation at once (about 10 GB for the digits MLP's 4810 parameters
    and 1597 examples), a chunk's only its share.
    """
    n = num_examples(data)

    def summed_loss(theta, chunk):
        return flat.task.loss_from_outputs(flat.outputs(theta, chunk), chunk).sum()

    size = flat.theta.numel()
    total = torch.zeros(size, size, dtype=flat.theta.dtype, device=flat.theta.device)
    for rows in batch_slices(n, chunk_size):
        total += hessian(summed_loss)(flat.theta, take(data, rows))
    return total / n


GN_CHUNK_BYTES = 1 << 28
"""Memory of the per-example ``P × P`` terms `gauss_newton` holds at once (256 MB)."""


def gauss_newton(flat: FlatModel, data: ExampleSet) -> torch.Tensor:
    """``(1/n) Σ J_iᵀ Λ_i J_i``, ``[P, P]``: the curvature that sampled labels reproduce."""

    def one(theta, example):
        batch = _single(example)
        jac = jacrev(lambda t: flat.outputs(t, batch)[0])(theta).reshape(-1, theta.numel())
        g0 = flat.outputs(theta, batch)[0].detach()
        lam = hessian(lambda g: flat.task.loss_from_outputs(g.unsqueeze(0), batch)[0])(g0)
        lam = lam.reshape(jac.shape[0], jac.shape[0])
        return jac.T @ lam @ jac

    # vmap over every example at once would hold n × P × P: chunk the examples so that a
    # chunk's terms stay within GN_CHUNK_BYTES (at least one example a chunk).
    n, size = num_examples(data), flat.theta.numel()
    per_example = size * size * flat.theta.element_size()
    chunk = max(1, GN_CHUNK_BYTES // per_example)
    total = torch.zeros(size, size, dtype=flat.theta.dtype, device=flat.theta.device)
    for start in range(0, n, chunk):
        rows = {k: v[start : start + chunk] for k, v in data.items()}
        total += vmap(one, in_dims=(None, 0))(flat.theta, rows).sum(dim=0)
    return total / n


def outer_mean(grads: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ g_i g_iᵀ`` of per-example gradients ``[n, P]``, ``[P, P]``."""
    return grads.T @ grads / grads.shape[0]


def influence_function(
    train_grads: torch.Tensor, query_grads: torch.Tensor, curvature: torch.Tensor
) -> torch.Tensor:
    """``(1/n) ∇L_iᵀ C⁻¹ ∇M_j``, ``[n_train, m_query]`` (paper eq. (1); C = H + λ)."""
    solved = torch.linalg.solve(curvature, query_grads.T)
    return train_grads @ solved / train_grads.shape[0]


def sandwich(
    train_grads: torch.Tensor,
    query_grads: torch.Tensor,
    curvature: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """``∇L_iᵀ C⁻¹ N C⁻¹ ∇M_j``, ``[n_train, m_query]``."""
    left = torch.linalg.solve(curvature, train_grads.T)
    right = torch.linalg.solve(curvature, query_grads.T)
    return left.T @ noise @ right


@dataclass
class ExactTargets:
    """Closed-form quantities of a small model at ``θ0`` (see the module table), float64.

    Attributes:
        influence: the influence function, ``[n_train, m_query]``.
        target: the limit of DAUNCE's covariance for the given objective, same shape.
        self_target: the limit of each training loss's variance, ``[n_train]``.
    """

    influence: np.ndarray
    target: np.ndarray
    self_target: np.ndarray


def exact_targets(
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    variant: str,
    labels: str,
    l2: float,
    measurement: Measurement = "loss",
    scale: float = 1.0,
) -> ExactTargets:
    """The influence function and DAUNCE's exact covariance limit for a small model.

    Args:
        model: the base model θ0, in the dtype to compute in (float64 recommended).
        task: the model protocol.
        train: training examples (``n`` rows).
        queries: query examples (``m`` rows).
        variant: ``"hessian"``, ``"efim"`` or ``"trak"``.
        labels: ``"observed"`` or ``"sampled"``.
        l2: λ, the base model's L2 strength (and the proximal weight).
        measurement: the query measurement.
        scale: multiplies the target, e.g. ``(ρ/γ)² / s`` to compare magnitudes.
    """
    check_small(model, task)
    flat = FlatModel(model, task)
    g_train = per_example_gradients(flat, train, task.loss_from_outputs)
    g_query = per_example_gradients(flat, queries, measurement_fn(task, measurement))
    eye = torch.eye(flat.theta.numel(), dtype=flat.theta.dtype, device=flat.theta.device)
    hess = loss_hessian(flat, train) + l2 * eye
    curvature, noise = _curvature_and_noise(flat, train, g_train, hess, variant, labels)
    curvature = curvature if variant == "hessian" else curvature + l2 * eye
    return ExactTargets(
        influence=influence_function(g_train, g_query, hess).double().cpu().numpy(),
        target=scale * sandwich(g_train, g_query, curvature, noise).double().cpu().numpy(),
        self_target=scale
        * sandwich(g_train, g_train, curvature, noise).diagonal().double().cpu().numpy(),
    )


def _curvature_and_noise(flat, train, g_train, hess, variant, labels):
    if variant == "hessian":
        curvature, observed = hess, outer_mean(g_train)
    elif variant == "efim":
        curvature = observed = outer_mean(g_train)
    elif variant == "trak":
        curvature = observed = outer_mean(
            per_example_gradients(flat, train, flat.task.margin_from_outputs)
        )
    else:
        raise DaunceError(f"variant must be 'hessian', 'efim' or 'trak'; got {variant!r}.")
    noise = gauss_newton(flat, train) if labels == "sampled" else observed / 3.0
    return curvature, noise


def check_gradients_fit(
    model: nn.Module, task: Task, rows: int, limit_bytes: int = 4 << 30
) -> None:
    """Refuse per-example gradients of ``rows`` examples that would not fit in ``limit_bytes``.

    Gradient dot products and TRAK keep an ``[rows, P]`` matrix (float32), not ``P × P``.
    """
    count = sum(p.numel() for p in task.trainable_parameters(model).values())
    size = 4 * rows * count
    if size > limit_bytes:
        raise DaunceError(
            f"per-example gradients of {rows} examples × P={count} trainable parameters take "
            f"{size / 2**30:.1f} GiB (limit {limit_bytes / 2**30:.0f} GiB); use DAUNCE itself, "
            "fewer examples, or fewer trainable parameters (a smaller LoRA rank)."
        )


def check_small(model: nn.Module, task: Task, limit: int = 20_000) -> None:
    """Refuse models too large for exact ``P × P`` curvature matrices."""
    count = sum(p.numel() for p in task.trainable_parameters(model).values())
    if count > limit:
        raise DaunceError(
            f"exact influence forms P×P matrices; this model has P={count} trainable parameters "
            f"(limit {limit}). Use DAUNCE itself, or restrict trainable_parameters."
        )

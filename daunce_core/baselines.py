"""Baseline attribution methods for small models, on the same footing as DAUNCE's scores.

Every function returns a score matrix oriented ``[n_train, m_query]`` with positive values for
proponents, so any of them can be evaluated by the same LDS and subset-removal code:

* `gradient_dot` — ``∇L_iᵀ ∇M_j`` (no curvature);
* `influence` — the influence function ``(1/n) ∇L_iᵀ (H + λ + δ)⁻¹ ∇M_j`` with the exact Hessian
  (paper eq. (1)), damping ``δ``;
* `trak` — TRAK (Park et al. 2023) with one model: margin gradients ``φ = ∇f`` projected by a
  Gaussian ``P`` (``[P_params, k]``), ``(1 − p_i) · φ_iᵀP (PᵀΦᵀΦP + δ)⁻¹ Pᵀφ_j``.

They form per-example gradients (``[n, P]``), so they are meant for the small models of the
benchmarks; DAUNCE itself never does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from daunce_core.data import ExampleSet
from daunce_core.influence import (
    FlatModel,
    check_small,
    influence_function,
    loss_hessian,
    measurement_fn,
    per_example_gradients,
)
from daunce_core.task import Measurement, Task


def _grads(
    model: nn.Module, task: Task, train: ExampleSet, queries: ExampleSet, measurement: Measurement
) -> tuple[FlatModel, torch.Tensor, torch.Tensor]:
    check_small(model, task)
    flat = FlatModel(model, task)
    g_train = per_example_gradients(flat, train, task.loss_from_outputs)
    g_query = per_example_gradients(flat, queries, measurement_fn(task, measurement))
    return flat, g_train, g_query


def gradient_dot(
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    measurement: Measurement = "loss",
) -> np.ndarray:
    """``∇L_iᵀ ∇M_j``: ``[n_train, m_query]``."""
    _, g_train, g_query = _grads(model, task, train, queries, measurement)
    return (g_train @ g_query.T).double().numpy()


def influence(
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    l2: float,
    damping: float = 0.0,
    measurement: Measurement = "loss",
) -> np.ndarray:
    """The influence function with the exact Hessian of the training objective (plus δ)."""
    flat, g_train, g_query = _grads(model, task, train, queries, measurement)
    eye = torch.eye(flat.theta.numel(), dtype=flat.theta.dtype)
    curvature = loss_hessian(flat, train) + (l2 + damping) * eye
    return influence_function(g_train, g_query, curvature).double().numpy()


def trak(
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    projection_dim: int = 512,
    damping: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """TRAK's score with one model: projected margin gradients and TRAK's ``1 − p`` weights."""
    check_small(model, task)
    flat = FlatModel(model, task)
    phi_train = per_example_gradients(flat, train, task.margin_from_outputs)
    phi_query = per_example_gradients(flat, queries, task.margin_from_outputs)
    generator = torch.Generator().manual_seed(seed)
    projection = (
        torch.randn(phi_train.shape[1], projection_dim, generator=generator, dtype=phi_train.dtype)
        / projection_dim**0.5
    )
    # The kernel can be near-singular (more projected dimensions than examples): solve in float64.
    x_train, x_query = (phi_train @ projection).double(), (phi_query @ projection).double()
    kernel = x_train.T @ x_train
    if damping is None:
        damping = 1e-4 * float(kernel.diagonal().mean())
    kernel = kernel + damping * torch.eye(projection_dim, dtype=x_train.dtype)
    weights = 1.0 - _correct_probability(flat, task, train).double()
    scores = weights[:, None] * (x_train @ torch.linalg.solve(kernel, x_query.T))
    return scores.double().numpy()


def _correct_probability(flat: FlatModel, task: Task, data: ExampleSet) -> torch.Tensor:
    """``p_i`` of the correct answer, from the margin ``f = log(p/(1−p))``: ``sigmoid(f)``."""
    with torch.no_grad():
        return torch.sigmoid(task.margin_from_outputs(flat.outputs(flat.theta, data), data))

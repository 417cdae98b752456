"""Subspace-curvature scores: the influence function restricted to the copies' span (DESIGN §1).

With copies ``θ^k = θ0 + Δ_k`` (k = 1..K), the influence function (paper eq. (1))
``(1/n) ∇L_iᵀ (H + λ)⁻¹ ∇M_j`` restricted to the span of the ``Δ_k`` is

    ``S = (1/n) Aᵀ Q⁺ B``,  shape ``[n_train, m_query]``,

with ``A_ki ≈ ∇L_iᵀ Δ_k`` (``[K, n]``), ``B_kj ≈ ∇M_jᵀ Δ_k`` (``[K, m]``) and
``Q = Δᵀ (G + λI) Δ`` (``[K, K]``), the Gauss-Newton curvature ``G`` plus the proximal ``λ`` in the
span. Once the ``Δ_k`` span the parameter space (K ≥ P) it is the influence function itself
(with the Gauss-Newton curvature: exactly so for generalised linear models); below that, its
restriction to the directions the perturbations explore. No Monte-Carlo average is involved: any
spanning set of copies gives the same scores, and copies need not reach their perturbed optimum.

The loss changes come from `ReflectedLosses`: central differences ``(L(θ0+Δ_k) − L(θ0−Δ_k))/2``
with the reflected copy ``θ0 − Δ_k`` (loss evaluation only, no training) cancel the second-order
term, so ``A = ∇Lᵀ Δ + O(‖Δ‖³)``; the one-sided ``L(θ0+Δ_k) − L(θ0)`` (for copies that cannot be
reflected) keeps an ``O(‖Δ‖²)`` error. The model kinds compute ``Q`` in output space
(`daunce_core.access.torch_module.subspace`).

Orientation and sign as every score of the project: ``scores[i, j]`` is the influence of training
example ``i`` on query ``j``; positive means training on ``i`` lowers the query's loss (a
proponent). The scale is the influence function's (the ``1/n`` of eq. (1) included), not the
covariance's.

``Q⁺`` is the pseudo-inverse of the symmetrised ``Q`` whose eigenvalues below ``rtol`` times the
largest are dropped (`DEFAULT_RTOL`): copies that repeat a direction (K above the problem's
effective dimension) or that differ only by rounding then add nothing, instead of dividing noise
by a near-zero curvature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daunce_core.errors import DaunceError

DEFAULT_RTOL = 1e-4
"""Eigenvalues of ``Q`` below this fraction of the largest are truncated. Measured on the digits
benchmarks (``bench/bench_subspace.py``, float32 copies; ``bench/results/subspace_cpu.json``):
1e-4 scored at least as well as 1e-6, 1e-8 and 0 at every K on both models, and better once K
passes the effective dimension (softmax regression, K = 800 > P = 650: LDS 0.961 against 0.860
at 1e-8 and 0.251 untruncated); 1e-2 cut real directions on the convex model (0.934 against
0.957 at K = 400) but helped the MLP at K = 800 (0.704 against 0.670)."""


@dataclass
class ReflectedLosses:
    """Measurements of K copies, of their reflections and of the base model on one example set.

    Attributes:
        plus: ``[K, n]`` measurement at ``θ0 + Δ_k`` (the trained copy), float64.
        minus: ``[K, n]`` at ``θ0 − Δ_k`` (the reflected copy), float64.
        base: ``[n]`` at ``θ0``, float64.
    """

    plus: np.ndarray
    minus: np.ndarray
    base: np.ndarray

    def central(self) -> np.ndarray:
        """``(plus − minus) / 2``, ``[K, n]``: the loss changes with no second-order term."""
        return (self.plus - self.minus) / 2.0

    def one_sided(self) -> np.ndarray:
        """``plus − base``, ``[K, n]``: the loss changes of the trained copies alone."""
        return self.plus - self.base

    def finite_rows(self) -> np.ndarray:
        """``[K]`` bool: copies whose measurements are all finite (both signs)."""
        return np.isfinite(self.plus).all(axis=1) & np.isfinite(self.minus).all(axis=1)


@dataclass
class SubspaceLosses:
    """Everything the subspace scores need from K copies.

    Attributes:
        train: measurements of the training set (losses), rows = copies.
        query: measurements of the queries (the run's measurement), rows = copies.
        curvature: ``Q``, ``[K, K]``: ``(1/n) Σ_i dz_ikᵀ H_i dz_il + λ Δ_kᵀ Δ_l``.
    """

    train: ReflectedLosses
    query: ReflectedLosses
    curvature: np.ndarray

    def finite_rows(self) -> np.ndarray:
        """``[K]`` bool: copies whose measurements and curvature row are all finite."""
        return (
            self.train.finite_rows()
            & self.query.finite_rows()
            & np.isfinite(self.curvature).all(axis=1)
        )


def curvature_pinv(curvature: np.ndarray, rtol: float = DEFAULT_RTOL) -> tuple[np.ndarray, int]:
    """The truncated pseudo-inverse ``Q⁺`` of the symmetrised ``Q`` (``[K, K]``), and its rank.

    Eigenvalues ``w ≤ rtol · max(w)`` are dropped (negative ones too: ``Q`` is PSD up to
    rounding).

    Raises:
        DaunceError: If ``Q`` is not a finite square matrix, ``rtol`` is not in [0, 1), or no
            eigenvalue is positive (the copies did not move).
    """
    q = np.asarray(curvature, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != q.shape[1] or not np.isfinite(q).all():
        raise DaunceError(f"the curvature Q must be a finite K × K matrix; got shape {q.shape}.")
    if not 0 <= rtol < 1:
        raise DaunceError(f"rtol must be in [0, 1); got {rtol}.")
    values, vectors = np.linalg.eigh((q + q.T) / 2.0)
    top = values.max(initial=0.0)
    if not top > 0:
        raise DaunceError(
            "the copies' curvature Q has no positive eigenvalue: the copies did not move from "
            "θ0 (check the learning rate and rho)."
        )
    keep = values > rtol * top
    kept = vectors[:, keep]
    return (kept / values[keep]) @ kept.T, int(keep.sum())


def subspace_scores(
    train_changes: np.ndarray,
    query_changes: np.ndarray,
    curvature: np.ndarray,
    *,
    rtol: float = DEFAULT_RTOL,
) -> np.ndarray:
    """``S = (1/n) Aᵀ Q⁺ B``, shape ``[n_train, m_query]`` float32 (positive = proponent).

    Args:
        train_changes: ``A``, ``[K, n]``: loss changes of the training examples from ``θ0``
            (`ReflectedLosses.central`, or `ReflectedLosses.one_sided`).
        query_changes: ``B``, ``[K, m]``: measurement changes of the queries, same form.
        curvature: ``Q``, ``[K, K]``, of the same K copies in the same order.
        rtol: eigenvalues of ``Q`` below ``rtol`` times the largest are truncated.

    Raises:
        DaunceError: On shapes that do not match, non-finite values, or a ``Q`` with no positive
            eigenvalue.
    """
    a = np.asarray(train_changes, dtype=np.float64)
    b = np.asarray(query_changes, dtype=np.float64)
    _check_changes(a, b, np.shape(curvature))
    pinv, _ = curvature_pinv(curvature, rtol)
    return (a.T @ (pinv @ b) / a.shape[1]).astype(np.float32)


def _check_changes(a: np.ndarray, b: np.ndarray, q_shape: tuple) -> None:
    if a.ndim != 2 or b.ndim != 2 or not a.shape[0] == b.shape[0] == q_shape[0]:
        raise DaunceError(
            f"loss changes A {a.shape} and B {b.shape} must be (K, n) and (K, m) with the K of "
            f"the curvature Q {q_shape}: rows are the same copies."
        )
    if a.shape[0] < 1 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DaunceError(
            "the subspace scores need at least one copy and finite loss changes; leave diverged "
            "copies out (their rows and Q's rows and columns)."
        )

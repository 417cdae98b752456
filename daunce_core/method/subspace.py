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
from typing import Any

import numpy as np

from daunce_core.errors import DaunceError

DEFAULT_RTOL = 1e-4
"""Eigenvalues of ``Q`` below this fraction of the largest are truncated. Measured on the digits
benchmarks (``bench/bench_subspace.py``, float32 copies; ``bench/results/subspace_cpu.json``):
1e-4 scored at least as well as 1e-6, 1e-8 and 0 at every K on both models, and better once K
passes the effective dimension (softmax regression, K = 800 > P = 650: LDS 0.961 against 0.860
at 1e-8 and 0.251 untruncated); 1e-2 cut real directions on the convex model (0.934 against
0.957 at K = 400) but helped the MLP at K = 800 (0.704 against 0.670)."""


CURVATURE_VALUES = 65536
"""The output-space part of ``Q`` is averaged over at most this many curvature-factor values per
copy (examples × factor values per example, `Task.curvature_factors`), or over as many as the
copy has parameters where that is more (a copy's factors never take more room than twice the
copy): every training example when they fit, else a sample of them (`curvature_rows`). The
pipeline stores each copy's two factors on those examples, so that ``Q`` can be formed across
copies trained by different tasks."""


def curvature_rows(
    n: int, values_per_example: int, seed: int = 0, budget: int = CURVATURE_VALUES
) -> np.ndarray:
    """The training examples ``Q``'s output part averages over, sorted ``[n_c]`` int64.

    All ``n`` when ``n × values_per_example ≤ budget``; else a uniform sample of
    ``max(1, budget // values_per_example)`` drawn with ``seed`` (the same for every copy, group
    and process). ``budget``: `CURVATURE_VALUES`, or a copy's parameter count where larger.
    """
    count = max(1, max(budget, CURVATURE_VALUES) // max(1, values_per_example))
    if n <= count:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, count]))
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


def output_gram(changes: np.ndarray, curved: np.ndarray) -> np.ndarray:
    """``(1/n_c) Σ_i dz_ikᵀ H_i dz_il``, ``[K, K]`` float64, from the copies' output changes.

    ``changes``, ``curved``: the two curvature factors (``dz`` and ``H dz`` for most tasks),
    ``[K, n_c, ...]`` (`daunce_core.access.torch_module.subspace.output_changes`).
    """
    count = changes.shape[0]
    flat = np.asarray(changes, dtype=np.float64).reshape(count, -1)
    return flat @ np.asarray(curved, dtype=np.float64).reshape(count, -1).T / changes.shape[1]


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
        curvature: ``Q``, ``[K, K]``: ``(1/n_c) Σ_i dz_ikᵀ H_i dz_il + λ Δ_kᵀ Δ_l`` over the
            examples of `curvature_rows`.
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


@dataclass
class Reflections:
    """What the pipeline keeps of some copies for the subspace scores, beside their loss rows.

    Attributes:
        train: ``[G, n]`` losses of the reflected copies ``θ0 − Δ_k``, float64.
        query: ``[G, m]`` their measurements on the queries, float64.
        changes: ``[G, n_c, ...]`` output changes ``dz`` on the curvature examples, float32.
        curved: ``[G, n_c, ...]`` ``H dz``, float32.
    """

    train: np.ndarray
    query: np.ndarray
    changes: np.ndarray
    curved: np.ndarray


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


def valid_copies(*arrays: Any, count: int, values: int = 1 << 22) -> np.ndarray:
    """``[count]`` bool: the leading copies whose rows are finite in every array.

    ``arrays``: ``[K, ...]`` array-likes (K ≥ ``count``), read about ``values`` values at a time
    so that out-of-core arrays are never loaded whole.
    """
    valid = np.ones(count, dtype=bool)
    for array in arrays:
        inner = int(np.prod(array.shape[2:], dtype=np.int64))
        step = max(1, values // max(1, count * inner))
        for c0 in range(0, array.shape[1], step):
            block = np.asarray(array[:count, c0 : c0 + step])
            valid &= np.isfinite(block.reshape(count, -1)).all(axis=1)
    return valid


def write_subspace_scores(
    train: tuple[Any, Any],
    query: tuple[Any, Any],
    curvature: np.ndarray,
    valid: np.ndarray,
    out: Any = None,
    *,
    rtol: float = DEFAULT_RTOL,
    row_chunk: int = 8192,
    col_chunk: int = 1024,
) -> tuple[Any, np.ndarray]:
    """`subspace_scores` out of core: ``S = (1/n) Aᵀ Q⁺ B`` tile by tile, and self-influence.

    Args:
        train: ``(plus, minus)``, ``[K, n]`` array-likes (the loss rows of the copies and of their
            reflections, e.g. Zarr arrays); ``A = (plus − minus) / 2``.
        query: the same for the queries, ``[K, m]``.
        curvature: ``Q`` of the ``valid`` copies, ``[K_valid, K_valid]``.
        valid: ``[K]`` bool, the copies to use (rows of ``train`` and ``query``).
        out: array-like ``[n, m]`` written tile by tile (default: a new float32 array).
        rtol: `curvature_pinv`'s truncation.
        row_chunk: training examples per tile.
        col_chunk: queries per tile.

    Returns:
        ``out`` and the self-influence ``(1/n) A_iᵀ Q⁺ A_i`` of every training example
        (``[n]`` float64: the diagonal ``S`` would have if the queries were the training set).
    """
    rows = np.flatnonzero(valid)
    n, m = train[0].shape[1], query[0].shape[1]
    if not len(rows) or curvature.shape != (len(rows), len(rows)):
        raise DaunceError(
            f"the subspace scores need at least one valid copy and a Q of the valid copies; "
            f"got {len(rows)} valid and Q {curvature.shape}."
        )
    pinv, _ = curvature_pinv(curvature, rtol)
    out = np.full((n, m), np.nan, dtype=np.float32) if out is None else out
    own = np.zeros(n)

    def central(pair, c0: int, c1: int) -> np.ndarray:
        plus, minus = (np.asarray(a[: len(valid), c0:c1], dtype=np.float64)[rows] for a in pair)
        return (plus - minus) / 2.0

    for c0 in range(0, m, col_chunk):
        c1 = min(c0 + col_chunk, m)
        weights = pinv @ central(query, c0, c1) / n  # [K_valid, block of queries]
        for r0 in range(0, n, row_chunk):
            r1 = min(r0 + row_chunk, n)
            a = central(train, r0, r1)
            out[r0:r1, c0:c1] = (a.T @ weights).astype(np.float32)
            if c0 == 0:
                own[r0:r1] = np.einsum("ki,ki->i", a, pinv @ a) / n
    return out, own

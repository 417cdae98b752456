"""Random draws of each perturbed copy, deterministic from ``(seed, k)`` (Algorithm 1, lines 2–3).

Copy ``k`` gets a subset ``D^k`` of ``round(r·n)`` training examples drawn uniformly without
replacement, and one ``ξ_i^k ~ U(0, 1)`` for *every* training example (so ``σ = 2ξ − 1`` is
zero-mean). The draws depend only on ``(seed, k)`` — never on how copies are grouped, ordered or
spread over workers — so any copy can be recomputed alone, and adding copies ``K → K'`` keeps the
first ``K`` unchanged.

With ``antithetic=True`` copies come in pairs ``(2p, 2p+1)`` that share the subset and use ``ξ``
and ``1 − ξ``: the perturbation flips sign within the pair, which cancels the even-order
(nonlinear) part of the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from daunce_core.errors import DaunceError


class Stream(IntEnum):
    """Every random stream of the project, in one registry: ids are never reused or changed.

    A stream's generator is seeded by ``(seed, index, stream, *extra)`` (`stream_rng`), so two
    uses of randomness never share draws, and each stays the same whatever else is added.
    """

    SUBSET = 0  # copy k's subset D^k
    XI = 1  # copy k's ξ for every training example
    ORDER = 2  # copy k's visiting order, per epoch
    TOKEN_XI = 3  # copy k's uniforms per answer token (sampled labels of a language model)
    API_SAMPLES = 4  # copy k's seed of the completions an API samples from θ0 (per attempt)
    PROMPT_SEARCH = 5  # copy k's prompts sampled at each step of its prompt search
    LDS_SUBSETS = 7  # the LDS ground truth's random subsets
    REMOVAL_RANDOM = 11  # subset removal: the random examples removed
    REMOVAL_ORDER = 12  # subset removal: a retraining's visiting order
    REMOVAL_GROUP = 13  # subset removal: which queries a label group keeps
    CURVATURE_PROBES = 14  # the seed of the completions θ0 samples for an API run's probes


_XI_EPS = 1e-12


@dataclass(frozen=True)
class PerturbationDraw:
    """The random draws of one perturbed copy.

    Attributes:
        k: copy index.
        subset: sorted indices of ``D^k``, int64, shape ``[round(r·n)]``.
        xi: ``ξ^k`` for every training example, float64, shape ``[n]``, in (0, 1).
            (A language model's sampled labels use ``[n, tokens]``, `token_uniforms`.)
        source: the copy whose random streams these draws come from: ``k`` itself, or the even
            partner of an antithetic pair (the pair also shares its visiting order).
    """

    k: int
    subset: np.ndarray
    xi: np.ndarray
    source: int


def stream_rng(seed: int, k: int, stream: int, *extra: int) -> np.random.Generator:
    """The random generator of stream ``stream`` of copy (or job) ``k`` under ``seed``."""
    sequence = np.random.SeedSequence([seed, k, int(stream), *extra])
    return np.random.Generator(np.random.PCG64(sequence))


def subset_size(n: int, subset_ratio: float) -> int:
    """``round(r·n)``; raises `DaunceError` if the subset would be empty."""
    size = round(subset_ratio * n)
    if size < 1:
        raise DaunceError(
            f"subset_ratio={subset_ratio} of n={n} training examples gives an empty subset; "
            f"raise subset_ratio to at least {1 / n:.3g} or add training examples."
        )
    return min(size, n)


def draw_perturbation(
    n: int, k: int, *, seed: int, subset_ratio: float, antithetic: bool = False
) -> PerturbationDraw:
    """Draw the subset and ``ξ`` of copy ``k`` out of ``n`` training examples."""
    source = k - (k % 2) if antithetic else k
    size = subset_size(n, subset_ratio)
    if size == n:
        subset = np.arange(n, dtype=np.int64)
    else:
        subset = np.sort(
            stream_rng(seed, source, Stream.SUBSET).choice(n, size=size, replace=False)
        )
    xi = stream_rng(seed, source, Stream.XI).random(n).clip(_XI_EPS, 1 - _XI_EPS)
    if antithetic and k % 2:
        xi = 1.0 - xi
    return PerturbationDraw(k=k, subset=subset.astype(np.int64), xi=xi, source=source)


def epoch_order(draw: PerturbationDraw, epoch: int, seed: int) -> np.ndarray:
    """The order in which copy ``draw.k`` visits its subset in ``epoch`` (a permutation)."""
    return stream_rng(seed, draw.source, Stream.ORDER, epoch).permutation(draw.subset)


def token_uniforms(draw: PerturbationDraw, seed: int, width: int) -> np.ndarray:
    """Copy ``draw.k``'s uniforms, one per training example and answer token, ``[n, width]``.

    A language model's sampled-label perturbation draws one token per completion position;
    each needs its own uniform (independent tokens give the Gauss-Newton covariance, which is
    block-diagonal over positions). Antithetic partners use ``u`` and ``1 − u``.
    """
    n = len(draw.xi)
    u = stream_rng(seed, draw.source, Stream.TOKEN_XI).random((n, width))
    u = u.clip(_XI_EPS, 1 - _XI_EPS)
    return 1.0 - u if draw.k != draw.source else u

"""Black-box discrete prompt learning (BDPL) over loss queries: the pure algorithm, in numpy.

A prompt of ``L`` positions, each a categorical distribution ``p_l`` over ``N`` candidate
phrases. Minimising ``E_{prompt ~ p}[F(prompt)]`` for a black-box ``F`` (the copy's perturbed
objective on a batch, read through loss queries only) by the variance-reduced score-function
estimator of Diao et al. (TMLR 2023): sample ``I`` prompts ``s``, read ``F_s``, and

    g = 1/(I − 1) · Σ_s (F_s − mean F) · ∇_p log P(prompt_s),
    ∇_{p_l} log P(prompt_s) = e_{j_sl} / p_l[j_sl],

then clip ``g`` to a norm, take an AdamW step and project each ``p_l`` back onto the simplex.
Nothing here reaches a model: `PromptAccess` supplies ``F``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from daunce_core.errors import DaunceError

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def mine_candidates(texts: Sequence[str], count: int, max_words: int) -> list[str]:
    """The ``count`` phrases of 1..``max_words`` words that best characterise ``texts``.

    Each phrase is scored by tf-idf over the texts (occurrences × log(texts / texts holding
    it)): frequent in the data, but not in every example. Phrases in fewer than two texts are
    left out (noise), ties broken by the phrase, so the list is the same on every machine.

    Raises:
        DaunceError: fewer than two phrases qualify.
    """
    occurrences: Counter = Counter()
    holding: Counter = Counter()
    for text in texts:
        words = _WORD.findall(text)
        grams = [
            " ".join(words[i : i + size])
            for size in range(1, max_words + 1)
            for i in range(len(words) - size + 1)
        ]
        occurrences.update(grams)
        holding.update(set(grams))
    total = max(len(texts), 1)
    scored = [
        (-(occurrences[g] * np.log(total / holding[g])), g)
        for g in occurrences
        if holding[g] >= 2 and holding[g] < total
    ]
    scored.sort()
    chosen = [g for _, g in scored[:count]]
    if len(chosen) < 2:
        raise DaunceError(
            f"the training texts hold {len(chosen)} phrase(s) that occur in two or more (but not "
            "all) examples; a learned prompt chooses among such phrases, so the training "
            "examples must share some words. Add training examples."
        )
    return chosen


def project_simplex(rows: np.ndarray) -> np.ndarray:
    """Each row's Euclidean projection onto the probability simplex (Duchi et al., 2008)."""
    n = rows.shape[-1]
    ordered = -np.sort(-rows, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1) - 1.0
    index = np.arange(1, n + 1)
    positive = ordered - cumulative / index > 0
    rho = n - 1 - np.argmax(positive[..., ::-1], axis=-1)
    theta = cumulative[np.arange(rows.shape[0]), rho] / (rho + 1)
    return np.maximum(rows - theta[:, None], 0.0)


@dataclass
class PolicyState:
    """A copy's search in progress: the distributions, AdamW's moments, what was spent.

    Attributes:
        step: steps taken.
        probs: ``[L, N]`` the distributions (rows on the simplex).
        m, v: AdamW's first and second moments, ``[L, N]``.
        calls: loss queries of the search so far (the budget's count).
        tokens: prompt tokens read for the search so far.
        largest: the most tokens one step has read (the token budget's estimate of the next).
        objective: the mean sampled objective of each step taken.
    """

    step: int
    probs: np.ndarray
    m: np.ndarray
    v: np.ndarray
    calls: int = 0
    tokens: int = 0
    objective: list[float] | None = None
    largest: int = 0

    @classmethod
    def start(cls, length: int, candidates: int) -> PolicyState:
        """Uniform distributions, zero moments."""
        shape = (length, candidates)
        return cls(0, np.full(shape, 1.0 / candidates), np.zeros(shape), np.zeros(shape), 0, 0, [])

    def as_dict(self) -> dict:
        """A JSON-ready dict (`from_dict` reads it back exactly: floats round-trip)."""
        return {
            "step": self.step,
            "probs": self.probs.tolist(),
            "m": self.m.tolist(),
            "v": self.v.tolist(),
            "calls": self.calls,
            "tokens": self.tokens,
            "objective": list(self.objective or []),
            "largest": self.largest,
        }

    @classmethod
    def from_dict(cls, saved: dict) -> PolicyState:
        """The state `as_dict` wrote."""
        return cls(
            int(saved["step"]),
            np.asarray(saved["probs"], dtype=np.float64),
            np.asarray(saved["m"], dtype=np.float64),
            np.asarray(saved["v"], dtype=np.float64),
            int(saved["calls"]),
            int(saved["tokens"]),
            [float(x) for x in saved.get("objective", [])],
            int(saved.get("largest", 0)),
        )

    def best(self) -> np.ndarray:
        """The most likely candidate of each position, ``[L]`` (ties: the first)."""
        return self.probs.argmax(axis=1)


def sample_prompts(probs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` prompts drawn from the distributions, ``[count, L]`` candidate indices."""
    cumulative = np.cumsum(probs, axis=1)
    cumulative[:, -1] = 1.0
    u = rng.random((count, probs.shape[0]))
    return np.stack(
        [np.searchsorted(cumulative[p], u[:, p], side="right") for p in range(probs.shape[0])],
        axis=1,
    ).clip(0, probs.shape[1] - 1)


def policy_gradient(probs: np.ndarray, chosen: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The variance-reduced estimate of ``∇_p E[F]`` from ``I`` samples, ``[L, N]``.

    Args:
        probs: ``[L, N]`` the distributions the samples came from.
        chosen: ``[I, L]`` each sample's candidate per position.
        values: ``[I]`` each sample's objective ``F_s``.
    """
    count, length = chosen.shape
    advantage = (values - values.mean()) / (count - 1)
    grad = np.zeros_like(probs)
    rows = np.arange(length)
    for s in range(count):
        picked = chosen[s]
        np.add.at(grad, (rows, picked), advantage[s] / np.maximum(probs[rows, picked], 1e-12))
    return grad


def adamw_step(
    state: PolicyState,
    grad: np.ndarray,
    learning_rate: float,
    weight_decay: float,
    clip: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One clipped AdamW step on ``state.probs``, then each row projected onto the simplex."""
    norm = float(np.linalg.norm(grad))
    if norm > clip:
        grad = grad * (clip / norm)
    b1, b2 = betas
    state.m = b1 * state.m + (1 - b1) * grad
    state.v = b2 * state.v + (1 - b2) * grad**2
    t = state.step + 1
    m_hat = state.m / (1 - b1**t)
    v_hat = state.v / (1 - b2**t)
    probs = state.probs * (1 - learning_rate * weight_decay)
    probs = probs - learning_rate * m_hat / (np.sqrt(v_hat) + eps)
    state.probs = project_simplex(probs)
    state.step = t

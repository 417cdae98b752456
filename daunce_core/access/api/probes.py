"""One-sided subspace scores for copies that cannot be reflected: API fine-tuning jobs (DESIGN §1).

A model fine-tuned behind an API has no parameters DAUNCE can negate, so the reflection
``θ0 − Δ_k`` cannot be evaluated. The subspace scores ``S = (1/n) Aᵀ Q⁺ B``
(`daunce_core.method.subspace`) then take two one-sided forms:

* **Loss changes** ``A = L(θ^k) − L(θ0)`` (error ``O(‖Δ‖²)`` where the reflected central
  difference has ``O(‖Δ‖³)``). They are stored as the reflected rows' first-order stand-in
  ``2 L(θ0) − L(θ^k)`` (`stand_in`), so that ``(plus − minus) / 2`` is the one-sided change and
  everything after (Zarr arrays, markers, streamed scores) is the reflected copies' own.
* **Curvature from sampled probes.** Without logits, ``Q``'s output part comes from the Fisher
  identity: for a completion ``y`` sampled from θ0, the log loss's Gauss-Newton curvature is
  ``E_y[(∇log p(y)ᵀΔ_k)(∇log p(y)ᵀΔ_l)]`` (the cross terms of different tokens vanish in
  expectation), and ``∇log p(y)ᵀΔ_k ≈ −C_y d_k(y)`` with ``d_k(y)`` the change of ``y``'s mean NLL
  under copy k and ``C_y`` its number of completion tokens. A loss that is the mean over ``C``
  tokens has ``1/C`` of that curvature, so with `PROBES` training prompts ``p``, each with one
  completion sampled from θ0 (temperature 1), ``Q_kl = (1/n_c) Σ_p C_p d_kp d_lp``: each copy's
  factor on probe ``p`` is ``d_kp √C_p`` (`probe_factors`).

The probes are drawn once per run and kept with θ0's losses on them, on the training set and on
the queries (`ProbeSet`, one JSON file): a server need not sample the same completions twice,
and every copy must be measured on the same probes for their factors to multiply into one ``Q``.
There is no parameter part (``λ Δ_kᵀ Δ_l``): the copies' parameters are the server's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from daunce_core.errors import DaunceError
from daunce_core.storage.digest import digest_json

PROBES = 512
"""Training prompts (at most) whose sampled completions estimate ``Q``: each copy is measured on
them once more beside its ``n + m`` losses."""


@dataclasses.dataclass
class ProbeSet:
    """The run's curvature probes and θ0's side of the one-sided scores.

    Attributes:
        rows: the training examples whose prompts are probed, ``[n_c]``.
        completions: one completion per probe, sampled from θ0, up to the first character the
            server could not decode (U+FFFD: a sample cut inside a character, whose text θ0
            never sampled); ``""`` if nothing is left: such a probe has no tokens and no
            weight.
        tokens: completion tokens of each probe, ``[n_c]`` (0 for an empty sample).
        probe: θ0's mean NLL of each probe's completion, ``[n_c]`` (NaN where empty).
        train: θ0's losses on the training set, ``[n]``.
        query: θ0's measurements of the queries, ``[m]``, for the queries of ``queries_key``.
        queries_key: digest of the queries ``query`` covers.
    """

    rows: list[int]
    completions: list[str]
    tokens: list[int]
    probe: list[float]
    train: list[float]
    query: list[float]
    queries_key: str

    def _digest(self) -> str:
        return digest_json(dataclasses.asdict(self))

    def write(self, path: Path) -> None:
        """Write to ``path`` atomically (JSON, with the digest of its fields)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        fields = dataclasses.asdict(self) | {"digest": self._digest()}
        partial.write_text(json.dumps(fields, allow_nan=True))
        partial.replace(path)

    @classmethod
    def read(cls, path: Path, num_train: int) -> ProbeSet | None:
        """The probes kept at ``path`` for ``num_train`` training examples.

        None if there are none or the file is damaged: unreadable, fields that do not fit each
        other or the training set, or values that are not the ones written (its digest).
        """
        try:
            fields = json.loads(Path(path).read_text())
            digest = fields.pop("digest")
            probes = cls(**fields)
            if digest != probes._digest():
                return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        lengths = {len(probes.rows), len(probes.completions), len(probes.tokens), len(probes.probe)}
        fits = all(0 <= row < num_train for row in probes.rows) and len(probes.train) == num_train
        return probes if len(lengths) == 1 and fits else None

    @property
    def used(self) -> np.ndarray:
        """``[n_c]`` bool: the probes with at least one completion token."""
        return np.asarray(self.tokens) > 0


def probe_rows(n: int, seed: int) -> np.ndarray:
    """The training examples probed: all ``n`` up to `PROBES`, else a seeded sample (sorted)."""
    if n <= PROBES:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, PROBES]))
    return np.sort(rng.choice(n, size=PROBES, replace=False)).astype(np.int64)


def probe_factors(copy_losses: np.ndarray, probes: ProbeSet) -> np.ndarray:
    """Each copy's curvature factor on the probes, ``d_kp √C_p``, ``[G, n_c]`` float32.

    ``copy_losses``: ``[G, n_c]`` mean NLL of each probe under each copy (any value where the
    probe is unused: its factor is 0). A copy with a non-finite loss on a used probe gets NaN
    factors (left out of the scores like a diverged copy).
    """
    tokens = np.asarray(probes.tokens, dtype=np.float64)
    used = probes.used
    change = np.where(used, np.asarray(copy_losses, dtype=np.float64) - probes.probe, 0.0)
    return (change * np.sqrt(tokens)).astype(np.float32)


def stand_in(plus: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``2 L(θ0) − L(θ^k)``: the reflected rows' first-order stand-in (one-sided changes)."""
    return 2.0 * np.asarray(base, dtype=np.float64) - np.asarray(plus, dtype=np.float64)


def check_probes(probes: ProbeSet) -> None:
    """Refuse a probe set none of whose samples has a completion token."""
    if not probes.used.any():
        raise DaunceError(
            "every completion θ0 sampled for the curvature probes was empty, so the one-sided "
            "subspace scores have no curvature to use; raise model.recipe.sample_max_tokens, "
            "or use score: correlation or covariance."
        )

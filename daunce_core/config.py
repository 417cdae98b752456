"""The configuration of a DAUNCE run, and config dataclasses from and to plain dicts.

`DaunceConfig` is frozen and checked on construction; `from_dict` builds any nested config
dataclass from YAML or JSON data, with errors that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from daunce_core.errors import DaunceError
from daunce_core.objectives import Objective
from daunce_core.task import MEASUREMENTS, Measurement
from daunce_core.training import TrainConfig

SCORE_KINDS = ("correlation", "covariance")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class DaunceConfig:
    """Everything that determines a DAUNCE run's perturbed copies and scores.

    Attributes:
        num_models: K, the number of perturbed copies (≥ 2; the paper uses 200 for vision).
        subset_ratio: r, the fraction of the training set each copy trains on (paper: 0.3).
        objective: the perturbed objective (variant, access, labels, γ, ρ).
        train: how each copy is trained (paper vision recipe: SGD momentum 0.9, cosine, 1 epoch).
        prox: λ of the proximal term ``γ·½λ‖θ − θ0‖²``; None uses the base model's own L2
            strength (the ``base_l2`` given to the run), so the perturbed objective has the
            training objective's curvature.
        measurement: query measurement, ``"loss"`` or ``"margin"`` (stored negated).
        score: ``"correlation"`` (the paper's default) or ``"covariance"``.
        dtype: ``"float32"`` or ``"float64"`` for the copies' training and losses.
        antithetic: pair copies ``(2p, 2p+1)`` with ``ξ`` and ``1 − ξ`` on the same subset.
        seed: the run's seed; copy k's draws depend only on ``(seed, k)``.
        group_size: copies trained at once (vectorised); memory grows with it.
        vectorize: train and evaluate a group with ``vmap`` (False: one copy after another).
        eval_batch_size: examples per forward pass when evaluating losses.
    """

    num_models: int = 64
    subset_ratio: float = 0.3
    objective: Objective = field(default_factory=Objective)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01, batch_size=64))
    prox: float | None = None
    measurement: Measurement = "loss"
    score: Literal["correlation", "covariance"] = "correlation"
    dtype: Literal["float32", "float64"] = "float32"
    antithetic: bool = False
    seed: int = 0
    group_size: int = 32
    vectorize: bool = True
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.num_models < 2:
            raise DaunceError(
                f"num_models (K) must be at least 2 to estimate a covariance; got "
                f"{self.num_models}. The paper uses K = 200."
            )
        if not 0 < self.subset_ratio <= 1:
            raise DaunceError(f"subset_ratio must be in (0, 1]; got {self.subset_ratio}.")
        if self.objective.access == "black_box" and self.subset_ratio == 1:
            raise DaunceError(
                "black-box objectives draw their randomness from the subset alone, so with "
                "subset_ratio=1 every copy is the same model; use subset_ratio < 1 (paper: 0.3)."
            )
        if self.prox is not None and self.prox < 0:
            raise DaunceError(f"prox (λ) must be >= 0 or None; got {self.prox}.")
        self._check_choices()
        if self.group_size < 1 or self.eval_batch_size < 1:
            raise DaunceError("group_size and eval_batch_size must be >= 1.")
        if self.antithetic and self.num_models % 2:
            raise DaunceError(
                f"antithetic copies come in pairs; num_models must be even, got {self.num_models}."
            )

    def _check_choices(self) -> None:
        for name, value, choices in (
            ("measurement", self.measurement, MEASUREMENTS),
            ("score", self.score, SCORE_KINDS),
            ("dtype", self.dtype, tuple(DTYPES)),
        ):
            if value not in choices:
                raise DaunceError(f"{name} must be one of {choices}; got {value!r}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]


def to_dict(value: Any) -> Any:
    """A config dataclass as plain dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_dict(v) for v in value]
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; errors name the field (``where``) and the fix."""
    if not isinstance(data, dict):
        raise DaunceError(f"config field {where or '(top)'} must be a mapping; got {data!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DaunceError(
            f"unknown config field(s) {[_join(where, u) for u in unknown]}; "
            f"known fields of {where or 'the config'}: {sorted(known)}."
        )
    values = {
        name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()
    }
    try:
        return cls(**values)
    except DaunceError as error:
        raise DaunceError(f"config field {where or '(top)'}: {error}") from error
    except TypeError as error:
        raise DaunceError(f"config field {where or '(top)'} is incomplete: {error}.") from error


def _item(cls: type, value: Any, where: str) -> Any:
    """A list item: a mapping, or a plain string for a dataclass whose ``from_name`` takes one."""
    if isinstance(value, str) and hasattr(cls, "from_name"):
        return cls.from_name(value)
    return from_dict(cls, value, where)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, where: str) -> Any:
    if isinstance(value, list):
        for arg in (hint, *typing.get_args(hint)):
            inner = typing.get_args(arg)
            if typing.get_origin(arg) is list and inner and dataclasses.is_dataclass(inner[0]):
                return [_item(inner[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    for cls in (hint, *typing.get_args(hint)):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return value if value is None else from_dict(cls, value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value

"""The configuration of a DAUNCE run: how copies are drawn, trained and scored.

`DaunceConfig` (with its copies' training recipe, `TrainConfig`) is frozen and checked on
construction; `daunce_core.conversion` builds it from YAML or JSON data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from daunce_core.access.task import MEASUREMENTS, Measurement
from daunce_core.errors import DaunceError
from daunce_core.method.objectives import Objective

SCORE_KINDS = ("correlation", "covariance", "subspace")
"""Score kinds of `DaunceConfig.score`; ``subspace`` needs copies that can be reflected (torch
models and LoRA copies: `daunce_core.attribute`, `TorchModuleAccess.run_subspace`,
`HFLoraAccess.run_subspace`, the pipeline's ``model.access: torch`` and ``hf_lora``) or fine-tuned
API models (one-sided, pipeline only); not prompt copies."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainConfig:
    """How each copy is trained.

    Attributes:
        optimizer: ``"sgd"`` (with momentum; the paper's vision recipe) or ``"adamw"`` (LLMs).
        lr: peak learning rate (> 0), or ``"auto"`` (SGD only): ``(1 − momentum) / L``, ``L``
            the largest curvature of the copies' objective at ``θ0`` (Lanczos on
            Hessian-vector products, `daunce_core.access.torch_module.training.largest_curvature`):
            heavy-ball momentum's effective step ``lr / (1 − momentum)`` is then ``1 / L``,
            gradient descent's step that cannot overshoot, whatever the model's scale or how the
            base was trained.
        momentum: SGD momentum (paper: 0.9).
        betas: AdamW betas.
        weight_decay: the optimiser's own decay towards zero (default 0; for an L2 penalty or a
            proximal term pass ``l2`` to `train_copies` instead).
        schedule: ``"cosine"`` (decay to 0 over the run) or ``"constant"``.
        epochs: passes over each copy's subset (may be fractional); ignored if ``steps`` is set.
        steps: exact number of optimiser steps (overrides ``epochs``).
        batch_size: examples per step and copy.
        tolerance: convergence criterion, or None (train every step). Each copy's residual
            ``‖∇F_k(θ)‖ / ‖∇F_k(θ0)‖`` (its perturbed objective's gradient, averaged over an
            epoch of its own batches, relative to the gradient at ``θ0``; the relative residual
            of the linear response the copy approximates) is checked after every epoch; a copy
            stops when it falls to ``tolerance`` and is recorded as converged. ``epochs`` /
            ``steps`` are then the most a copy trains.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float | Literal["auto"] = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 64
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise DaunceError(f"optimizer must be 'sgd' or 'adamw'; got {self.optimizer!r}.")
        if self.schedule not in ("cosine", "constant"):
            raise DaunceError(f"schedule must be 'cosine' or 'constant'; got {self.schedule!r}.")
        if self.lr == "auto" and self.optimizer != "sgd":
            raise DaunceError(
                "lr 'auto' sets SGD's step from the objective's curvature; AdamW rescales every "
                "step by its own statistics, so give it a number (e.g. lr: 1e-4) or use "
                "optimizer: sgd."
            )
        if isinstance(self.lr, str) and self.lr != "auto":
            raise DaunceError(f"lr must be a number > 0 or 'auto'; got {self.lr!r}.")
        if self.tolerance is not None and not 0 < self.tolerance < 1:
            raise DaunceError(
                f"tolerance must be in (0, 1) (a relative gradient norm) or None; got "
                f"{self.tolerance}."
            )
        lr_ok = self.lr == "auto" or (math.isfinite(self.lr) and self.lr > 0)
        if not (lr_ok and self.batch_size >= 1 and 0 <= self.momentum < 1):
            raise DaunceError(
                f"need a finite lr > 0 (or 'auto'), batch_size >= 1 and 0 <= momentum < 1; got "
                f"lr={self.lr}, batch_size={self.batch_size}, momentum={self.momentum}."
            )
        if self.steps is None and not self.epochs > 0:
            raise DaunceError(f"epochs must be > 0 (or set steps); got {self.epochs}.")
        if self.steps is not None and self.steps < 1:
            raise DaunceError(f"steps must be >= 1; got {self.steps}.")

    def total_steps(self, subset_size: int) -> int:
        """Optimiser steps for a subset of ``subset_size`` examples."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(subset_size / self.batch_size)
        return max(1, math.ceil(self.epochs * per_epoch))


@dataclass(frozen=True)
class DaunceConfig:
    """Everything that determines a DAUNCE run's perturbed copies and scores.

    The defaults are the project's, chosen by the worst case over five benchmarks (README,
    "Defaults from evidence"; the same in the library and the pipeline): K = 256 copies on the
    whole training set with sampled-label perturbations (ρ = 0.1), each trained for one epoch
    of SGD with momentum at the step the objective's curvature allows (``lr: auto``), scored by
    the influence function in the copies' span (``score: subspace``). `DaunceConfig.paper` gives
    the paper's Algorithm 1 form.

    Attributes:
        num_models: K, the number of perturbed copies (≥ 2; the paper uses 200 for vision).
        subset_ratio: r, the fraction of the training set each copy trains on (paper: 0.3).
        objective: the perturbed objective (variant, access, labels, γ, ρ).
        train: how each copy is trained (default: SGD momentum 0.9, cosine, ``lr: auto``, one
            epoch of batches of 64).
        prox: λ of the proximal term ``γ·½λ‖θ − θ0‖²``; None uses the base model's own L2
            strength (the ``base_l2`` given to the run), so the perturbed objective has the
            training objective's curvature.
        measurement: query measurement, ``"loss"`` or ``"margin"`` (stored negated).
        score: ``"subspace"`` (default), ``"correlation"`` (the paper's), ``"covariance"``: the
            influence function in the copies' span, from the copies, their reflections
            ``θ0 − Δ_k`` and the curvature in their span (`daunce_core.method.subspace`; see
            `SCORE_KINDS` for the kinds of copies), or the paper's eq. (6).
        dtype: ``"float32"`` or ``"float64"`` for the copies' training and losses.
        antithetic: pair copies ``(2p, 2p+1)`` with ``ξ`` and ``1 − ξ`` on the same subset.
        seed: the run's seed; copy k's draws depend only on ``(seed, k)``.

    How the copies are computed (group size, vectorisation, batch size of evaluation, device)
    is `ComputeConfig`'s: it never changes which copies a run holds.
    """

    num_models: int = 256
    subset_ratio: float = 1.0
    objective: Objective = field(default_factory=lambda: Objective(labels="sampled", rho=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr="auto", batch_size=64))
    prox: float | None = None
    measurement: Measurement = "loss"
    score: Literal["correlation", "covariance", "subspace"] = "subspace"
    dtype: Literal["float32", "float64"] = "float32"
    antithetic: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_models < 2:
            raise DaunceError(
                f"num_models (K) must be at least 2 (the scores compare copies); got "
                f"{self.num_models}. The default is K = 256, the paper's 64 to 200."
            )
        if not 0 < self.subset_ratio <= 1:
            raise DaunceError(f"subset_ratio must be in (0, 1]; got {self.subset_ratio}.")
        objective = self.objective
        if (
            objective.access == "black_box"
            and objective.labels == "observed"
            and self.subset_ratio == 1
        ):
            raise DaunceError(
                "black-box objectives with observed labels draw their randomness from the "
                "subset alone, so with subset_ratio=1 every copy is the same model; use "
                "subset_ratio < 1 (paper: 0.3), or labels 'sampled'."
            )
        if self.prox is not None and self.prox < 0:
            raise DaunceError(f"prox (λ) must be >= 0 or None; got {self.prox}.")
        self._check_choices()
        if self.antithetic and self.num_models % 2:
            raise DaunceError(
                f"antithetic copies come in pairs; num_models must be even, got {self.num_models}."
            )

    @classmethod
    def paper(cls, **changes) -> DaunceConfig:
        """The paper's Algorithm 1 form, with ``changes`` on top.

        K = 64 copies, each on a random 30% subset with the observed-label ``hessian``
        objective at γ = ρ = 1, one epoch of SGD (momentum 0.9, cosine, lr 0.01, batch 64),
        correlation scores (paper eq. (6)).
        """
        fields = {
            "num_models": 64,
            "subset_ratio": 0.3,
            "objective": Objective(),
            "train": TrainConfig(lr=0.01, batch_size=64),
            "score": "correlation",
        }
        return cls(**(fields | changes))

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


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ComputeConfig:
    """How copies are computed: never part of a run's identity (the copies are the same).

    Attributes:
        group_size: copies trained at once (vectorised); memory grows with it.
        vectorize: train and evaluate a group with ``vmap`` (False: one copy after another).
        eval_batch_size: examples per forward pass when evaluating losses.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    """

    group_size: int = 32
    vectorize: bool = True
    eval_batch_size: int = 1024
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.eval_batch_size < 1:
            raise DaunceError(
                f"group_size and eval_batch_size must be >= 1; got {self.group_size} and "
                f"{self.eval_batch_size}."
            )
        if self.device not in DEVICES:
            raise DaunceError(f"device must be one of {DEVICES}; got {self.device!r}.")

    @property
    def torch_device(self) -> torch.device:
        """The device named by ``device``; ``cuda`` without a GPU is refused."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise DaunceError(
                "device 'cuda' was asked for but torch sees no GPU here; use device: auto or cpu."
            )
        return torch.device(self.device)

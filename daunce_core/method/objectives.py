"""The perturbed training objectives of DAUNCE (paper eq. (5), Tables 1 and 2; DESIGN §1).

Per training example ``i`` of the subset ``D^k``, with base logits ``g0_i``, base value ``v0_i``
(the loss ``L_i(θ0)``, or the margin ``f_i(θ0)`` for ``trak``), its logit-gradient
``d_i = ∂v_i/∂g`` at ``θ0``, ``Δg_i = g(θ, x_i) − g0_i`` and ``σ_i = 2ξ_i − 1``:

=========  =====================================================  ===================
variant    white-box objective                                     black-box objective
=========  =====================================================  ===================
hessian    γ·(L_i − L0_i − ⟨d_i, Δg_i⟩) − ρ·⟨u_i, Δg_i⟩            γ·L_i
efim       γ·½(L_i − L0_i)² − ρ·⟨u_i, Δg_i⟩                         γ·½L_i²
trak       γ·½(f_i − f0_i)² − ρ·⟨u_i, Δg_i⟩                         γ·½f_i²
=========  =====================================================  ===================

The perturbation direction ``u_i`` is ``σ_i·d_i`` for observed labels (the paper), or
``ε_i = Task.logit_noise(g0_i, ξ_i)`` for sampled labels (a label drawn from the model's own
softmax, DESIGN §1), which makes the copies' spread follow the Gauss-Newton curvature instead of
the empirical Fisher. At ``γ = ρ = 1`` with observed labels the ``hessian`` row is the paper's
``L_i − L0_i − 2ξ_i⟨d_i, Δg_i⟩`` exactly (``1 + σ = 2ξ``); the ``efim`` and ``trak`` rows are
Table 1's. ``γ`` weighs the curvature ("ERM") part and ``ρ`` scales the perturbation, so the
copies move by about ``ρ/γ`` times the linear response. In the ``hessian`` row ``γ`` weighs the
whole Bregman term ``L − L0 − ⟨d, Δg⟩``, which keeps ``θ0`` a stationary point of every
unperturbed copy for any ``γ`` (the paper's first-order term also cancels the base model's residual
gradient, also on a subset). The first-order terms live in logit space
(``⟨∇L_i(θ0), θ−θ0⟩ ≈ ⟨d_i, Δg_i⟩``), exact for models linear in their parameters.

Black-box objectives (Table 2) have no first-order term: their randomness is the subset, and
with sampled labels the labels drawn from θ0 (the parametric bootstrap of DESIGN §1).
The proximal term ``γ·½λ‖θ − θ0‖²`` is added by the trainer, in parameter space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from daunce_core.access.task import Task
from daunce_core.data import ExampleSet
from daunce_core.errors import DaunceError

Variant = Literal["hessian", "efim", "trak"]
Access = Literal["white_box", "black_box"]
Labels = Literal["observed", "sampled"]
VARIANTS = ("hessian", "efim", "trak")
ACCESSES = ("white_box", "black_box")
LABELS = ("observed", "sampled")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DaunceError(f"{name} must be one of {choices}; got {value!r}.")


@dataclass(frozen=True)
class Objective:
    """Which perturbed objective the copies minimise.

    Attributes:
        variant: ``"hessian"`` (DAUNCE), ``"efim"`` (DAUNCE-E) or ``"trak"`` (DAUNCE-T).
        access: ``"white_box"`` (first-order perturbation term in logit space) or
            ``"black_box"`` (Table 2: losses only; randomness from the subset alone).
        labels: ``"observed"`` (σ_i·d_i, the paper) or ``"sampled"`` (labels drawn from the
            base model's own predictive distribution; in the black-box form each copy
            fine-tunes with plain NLL on labels sampled from θ0 — a parametric bootstrap,
            DESIGN §1 — which needs a kind that can draw them, `Capabilities.bootstrap`).
        gamma: weight γ > 0 of the curvature part (paper: 1).
        rho: scale ρ > 0 of the perturbation (paper: 1).
    """

    variant: Variant = "hessian"
    access: Access = "white_box"
    labels: Labels = "observed"
    gamma: float = 1.0
    rho: float = 1.0

    def __post_init__(self) -> None:
        _choice("variant", self.variant, VARIANTS)
        _choice("access", self.access, ACCESSES)
        _choice("labels", self.labels, LABELS)
        if self.access == "black_box" and self.labels == "sampled" and self.variant != "hessian":
            raise DaunceError(
                "black-box sampled labels fine-tune on completions sampled from the base model "
                f"with plain NLL, which is variant 'hessian'; got variant {self.variant!r}. Use "
                "variant 'hessian', or labels 'observed'."
            )
        for name in ("gamma", "rho"):
            if not getattr(self, name) > 0:
                raise DaunceError(f"{name} must be > 0; got {getattr(self, name)}.")

    @property
    def uses_margin(self) -> bool:
        """Whether the objective's value is the TRAK margin rather than the loss."""
        return self.variant == "trak"

    @property
    def needs_base_signals(self) -> bool:
        """Whether the objective needs base logits and logit-gradients (white-box)."""
        return self.access == "white_box"


def objective_value(task: Task, objective: Objective, outputs, batch: ExampleSet):
    """The value ``v`` the objective acts on: the loss, or the margin for ``trak``; ``[B]``."""
    if objective.uses_margin:
        return task.margin_from_outputs(outputs, batch)
    return task.loss_from_outputs(outputs, batch)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(dim=-1)


def perturbation_direction(
    task: Task, objective: Objective, base: dict[str, torch.Tensor], batch, xi
) -> torch.Tensor:
    """``u_i``: ``σ_i·d_i`` (observed labels) or ``Task.logit_noise`` (sampled), like logits."""
    if objective.labels == "sampled":
        return task.logit_noise(base["outputs"], batch, xi)
    sigma = (2.0 * xi - 1.0).to(base["grad"].dtype)
    return sigma.reshape(sigma.shape + (1,) * (base["grad"].dim() - 1)) * base["grad"]


def per_example_objective(
    task: Task,
    objective: Objective,
    outputs: torch.Tensor,
    batch: ExampleSet,
    base: dict[str, torch.Tensor] | None,
    xi: torch.Tensor,
) -> torch.Tensor:
    """Per-example perturbed objective of one copy on one batch, shape ``[B]``.

    Args:
        task: the model protocol.
        objective: which objective (see the module table).
        outputs: current logits ``g(θ, x)``, ``[B, ...]``.
        batch: the batch's columns.
        base: ``{"outputs": g0, "grad": d, "value": v0}`` rows of the batch (white-box), or None.
        xi: ``ξ`` of the batch's examples, ``[B]``.
    """
    value = objective_value(task, objective, outputs, batch)
    gamma = objective.gamma
    if objective.access == "black_box":
        return gamma * (value if objective.variant == "hessian" else 0.5 * value.pow(2))
    delta = outputs - base["outputs"]
    change = value - base["value"]
    if objective.variant == "hessian":
        curvature = change - _inner(base["grad"], delta)
    else:
        curvature = 0.5 * change.pow(2)
    direction = perturbation_direction(task, objective, base, batch, xi)
    return gamma * curvature - objective.rho * _inner(direction, delta)

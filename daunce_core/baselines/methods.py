"""Baseline attribution methods for small models, on the same footing as DAUNCE's scores.

Every function returns a score matrix oriented ``[n_train, m_query]`` with positive values for
proponents, so any of them can be evaluated by the same LDS and subset-removal code:

* `gradient_dot` — ``∇L_iᵀ ∇M_j`` (no curvature);
* `influence` — the influence function ``(1/n) ∇L_iᵀ (H + λ + δ)⁻¹ ∇M_j`` with the exact Hessian
  (paper eq. (1)), damping ``δ``;
* `trak` — TRAK (Park et al. 2023) with one model: margin gradients ``φ = ∇f`` projected by a
  Gaussian ``P`` (``[P_params, k]``), ``(1 − p_i) · φ_iᵀP (PᵀΦᵀΦP + δ)⁻¹ Pᵀφ_j``;
* `tracin` — TracIn-CP (Pruthi et al. 2020) over checkpoints of one training run, which
  `fit_checkpoints` keeps while training like `daunce_core.access.torch_module.training.fit`.

They form per-example gradients (``[n, P]``), so they are meant for the small models of the
benchmarks; DAUNCE itself never does. `baseline_scores` is the one entry point the pipeline
calls, by method name (`BASELINES`); it also reaches the peer packages' methods of
`daunce_core.baselines.peers` (kronfluence's EK-FAC, traker's TRAK ensembles).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from daunce_core.access.task import Measurement, Task
from daunce_core.access.torch_module.stacked import trainable_names
from daunce_core.access.torch_module.training import fit
from daunce_core.baselines.exact import (
    FlatModel,
    check_gradients_fit,
    influence_function,
    loss_hessian,
    measurement_fn,
    per_example_gradients,
)
from daunce_core.data import ExampleSet, num_examples
from daunce_core.errors import DaunceError, DaunceWarning
from daunce_core.method.config import TrainConfig


def _grads(
    model: nn.Module, task: Task, train: ExampleSet, queries: ExampleSet, measurement: Measurement
) -> tuple[FlatModel, torch.Tensor, torch.Tensor]:
    check_gradients_fit(model, task, num_examples(train) + num_examples(queries))
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
    return (g_train @ g_query.T).double().cpu().numpy()


INFLUENCE_SHIFT = 2.0
"""`influence` with ``damping=None`` adds this multiple of ``|λ_min|``, the magnitude of the
Hessian's most negative eigenvalue (`default_damping`)."""


def default_damping(hessian: torch.Tensor) -> float:
    """δ = `INFLUENCE_SHIFT` × max(0, −λ_min(H)): 0 for a positive semi-definite Hessian."""
    lowest = float(torch.linalg.eigvalsh(hessian.double())[0])
    return INFLUENCE_SHIFT * max(0.0, -lowest)


def influence(
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    l2: float,
    damping: float | None = 0.0,
    measurement: Measurement = "loss",
) -> np.ndarray:
    """The influence function with the exact Hessian of the training objective (plus δ).

    ``damping=None`` takes δ = `INFLUENCE_SHIFT` × max(0, −λ_min(H)). At the end of SGD a
    network's Hessian is often indefinite, and the undamped inverse is then dominated by the
    directions of near-zero curvature that negative eigenvalues cross into. Shifting by twice the
    most negative eigenvalue mirrors it: every curvature of ``H + δ`` is at least ``|λ_min|``. A
    convex objective (``λ_min ≥ 0``) keeps δ = 0, the closed form. On the digits benchmark this
    is within 0.005 LDS of the best of δ ∈ {0, 1e-3, 1e-2} on both the MLP and logistic
    regression, where any one of those δ loses 0.15 or more on one of them (`bench/bench_lds.py`).
    """
    flat, g_train, g_query = _grads(model, task, train, queries, measurement)
    hessian = loss_hessian(flat, train)
    if damping is None:
        damping = default_damping(hessian)
    eye = torch.eye(flat.theta.numel(), dtype=flat.theta.dtype, device=flat.theta.device)
    return (
        influence_function(g_train, g_query, hessian + (l2 + damping) * eye).double().cpu().numpy()
    )


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
    check_gradients_fit(model, task, num_examples(train) + num_examples(queries))
    flat = FlatModel(model, task)
    phi_train = per_example_gradients(flat, train, task.margin_from_outputs)
    phi_query = per_example_gradients(flat, queries, task.margin_from_outputs)
    generator = torch.Generator().manual_seed(seed)
    projection = (
        torch.randn(phi_train.shape[1], projection_dim, generator=generator, dtype=phi_train.dtype)
        / projection_dim**0.5
    ).to(phi_train.device)
    # The kernel can be near-singular (more projected dimensions than examples): solve in float64.
    x_train, x_query = (phi_train @ projection).double(), (phi_query @ projection).double()
    kernel = x_train.T @ x_train
    if damping is None:
        damping = 1e-4 * float(kernel.diagonal().mean())
    kernel = kernel + damping * torch.eye(
        projection_dim, dtype=x_train.dtype, device=x_train.device
    )
    eigen = torch.linalg.eigvalsh(kernel)
    if not eigen[0] > eigen[-1] * 1e-13:  # float64 solves lose all their digits near 1e16
        warnings.warn(
            f"TRAK's kernel is singular or nearly (condition number "
            f"{float(eigen[-1] / max(float(eigen[0]), 1e-300)):.1e}): projection_dim "
            f"{projection_dim} is more than the {num_examples(train)} training examples' "
            f"margin gradients span (the model has {phi_train.shape[1]} parameters, and "
            "symmetries such as a softmax's shared shift remove directions); its scores are "
            "unreliable. Use a smaller projection_dim, or a damping > 0.",
            DaunceWarning,
            stacklevel=2,
        )
    weights = 1.0 - _correct_probability(flat, task, train).double()
    scores = weights[:, None] * (x_train @ torch.linalg.solve(kernel, x_query.T))
    return scores.double().cpu().numpy()


def _correct_probability(flat: FlatModel, task: Task, data: ExampleSet) -> torch.Tensor:
    """``p_i`` of the correct answer, from the margin ``f = log(p/(1−p))``: ``sigmoid(f)``."""
    with torch.no_grad():
        return torch.sigmoid(task.margin_from_outputs(flat.outputs(flat.theta, data), data))


def tracin(
    checkpoints: Sequence[nn.Module],
    learning_rates: Sequence[float],
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    measurement: Measurement = "loss",
) -> np.ndarray:
    """TracIn-CP (Pruthi et al. 2020): ``Σ_c η_c ∇L_i(θ_c)ᵀ ∇M_j(θ_c)``, ``[n_train, m_query]``.

    Args:
        checkpoints: models at checkpoints ``θ_c`` of one training run (e.g. from
            `fit_checkpoints`); not modified.
        learning_rates: ``η_c``, one per checkpoint.
        task: the model protocol.
        train: training examples, ``n`` rows.
        queries: query examples, ``m`` rows.
        measurement: the query measurement, ``"loss"`` or ``"margin"`` (negated).
    """
    if len(checkpoints) != len(learning_rates) or not checkpoints:
        raise DaunceError(
            f"tracin needs one learning rate per checkpoint and at least one checkpoint; got "
            f"{len(checkpoints)} checkpoints and {len(learning_rates)} learning rates."
        )
    total = None
    for model, lr in zip(checkpoints, learning_rates, strict=True):
        term = float(lr) * gradient_dot(model, task, train, queries, measurement)
        total = term if total is None else total + term
    return total


Checkpoint = tuple[dict[str, torch.Tensor], float]
"""``(state_dict, lr)``: a model's state at a checkpoint and TracIn's weight ``η_c`` for it."""


def fit_checkpoints(
    model: nn.Module,
    task: Task,
    data: ExampleSet,
    config: TrainConfig,
    *,
    l2: float = 0.0,
    seed: int = 0,
    count: int = 5,
) -> list[Checkpoint]:
    """Train ``model`` in place like `fit`, keeping ``count`` checkpoints.

    Checkpoints are evenly spaced over the optimiser steps. The last one is the end of
    training, bitwise equal to ``fit``'s result with the same arguments (and to ``model``
    afterwards). Each checkpoint's ``lr`` is the mean learning rate of the steps since the
    previous checkpoint — the stretch of training it stands for (with a cosine schedule the
    rate at the last step itself is 0).

    Args:
        model: the initial model (trained in place, returned in ``eval()`` mode like ``fit``).
        task: the model protocol.
        data: training examples.
        config: the training recipe.
        l2: L2 strength, as for ``fit``.
        seed: visiting-order seed, as for ``fit``.
        count: number of checkpoints (at most the number of optimiser steps).

    Returns:
        ``[(state_dict, lr), ...]`` in training order; state dicts are independent copies.
    """
    total = config.total_steps(num_examples(data))
    if not 1 <= count <= total:
        raise DaunceError(f"count must be in [1, {total}] (the optimiser steps); got {count}.")
    marks = {round(total * (c + 1) / count) for c in range(count)}
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kept: list[Checkpoint] = []
    rates: list[float] = []

    def keep(step: int, params, lr: float) -> None:
        rates.append(lr)
        if step in marks:
            state = {key: value.clone() for key, value in base.items()}
            state.update({name: p.detach()[0].clone() for name, p in params.items()})
            kept.append((state, sum(rates) / len(rates)))
            rates.clear()

    fit(model, task, data, config, l2=l2, seed=seed, on_step=keep)
    return kept


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()


BASELINES = ("gradient_dot", "influence", "trak", "tracin", "ekfac", "trak_ensemble")
"""Method names `baseline_scores` accepts."""

_OPTIONS = {
    "gradient_dot": {"measurement": "loss"},
    "influence": {"damping": None, "measurement": "loss"},
    "trak": {"projection_dim": 512, "damping": 0.0},
    "tracin": {"checkpoints": 5, "measurement": "loss"},
    "ekfac": {"damping": None, "fisher": "sampled", "measurement": "loss", "batch_size": 256},
    "trak_ensemble": {"models": 5, "projection_dim": 512, "damping": 0.0},
}


def baseline_scores(
    method: str,
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    l2: float,
    make_model: Callable[[int], nn.Module] | None = None,
    train_config: TrainConfig | None = None,
    seed: int = 0,
    options: dict | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Scores of a baseline method, ``[n_train, m_query]``, positive = proponent.

    ``device`` runs the gradients and curvature there (``cuda`` when there is one): our
    methods move the model and data to it, kronfluence and traker are told to use it; TracIn's
    and the TRAK ensemble's retrainings stay on the CPU (their scoring does not).

    ``model`` is the trained model (``make_model(seed)`` trained by ``fit(..., train_config,
    l2=l2, seed=seed)`` when it was made that way). Methods and their ``options`` (defaults):

    * ``"gradient_dot"`` — `gradient_dot`. ``measurement`` (``"loss"``).
    * ``"influence"`` — `influence`, the exact influence function with curvature
      ``H + l2 + damping`` (small models). ``damping`` (None: `default_damping`,
      `INFLUENCE_SHIFT` × ``|λ_min|`` of an indefinite Hessian, else 0; 0 for the undamped
      closed form), ``measurement`` (``"loss"``). A network's Hessian can be indefinite at the
      end of SGD; `bench/bench_lds.py` reports the LDS of each damping on the digits MLP.
    * ``"trak"`` — `trak`, our TRAK with one model (margin measurement).
      ``projection_dim`` (512), ``damping`` (0; None = 1e-4 × the kernel's mean diagonal).
    * ``"tracin"`` — `tracin` over checkpoints of the base model's training, rebuilt by
      `fit_checkpoints` from ``make_model(seed)`` with ``train_config``, ``l2`` and ``seed`` (a
      warning if they do not end at ``model``). ``checkpoints`` (5), ``measurement``
      (``"loss"``).
    * ``"ekfac"`` — `daunce_core.baselines.peers.ekfac` (kronfluence), curvature EK-FAC Fisher
      ``+ l2 + damping``. ``damping`` (None: kronfluence's heuristic, 0.1 × each layer's mean
      eigenvalue, in place of ``l2 + damping``), ``fisher`` (``"sampled"`` or ``"empirical"``),
      ``measurement`` (``"loss"``), ``batch_size`` (256).
    * ``"trak_ensemble"`` — `daunce_core.baselines.peers.trak_scores` (traker) over ``model`` and
      ``models − 1`` more trained by ``fit`` from ``make_model(seed + i)`` with seed ``seed + i``.
      ``models`` (5), ``projection_dim`` (512), ``damping`` (traker's ``lambda_reg``, 0).

    ``seed`` also seeds the random projections and EK-FAC's sampled labels.

    Raises:
        DaunceError: an unknown method or option, or ``make_model``/``train_config`` missing
            where the method retrains.
    """
    if method not in _OPTIONS:
        raise DaunceError(f"unknown baseline method {method!r}; valid: {', '.join(BASELINES)}.")
    given = dict(options or {})
    unknown = sorted(set(given) - set(_OPTIONS[method]))
    if unknown:
        raise DaunceError(
            f"unknown option(s) {unknown} for baseline {method!r}; valid: "
            f"{', '.join(_OPTIONS[method])}."
        )
    opts = {**_OPTIONS[method], **given}
    device = torch.device(device)
    if method in ("gradient_dot", "influence", "trak"):
        model, train, queries = _placed(model, device), _on(train, device), _on(queries, device)
    if method == "gradient_dot":
        return gradient_dot(model, task, train, queries, opts["measurement"])
    if method == "influence":
        return influence(
            model,
            task,
            train,
            queries,
            l2=l2,
            damping=opts["damping"],
            measurement=opts["measurement"],
        )
    if method == "trak":
        return trak(
            model,
            task,
            train,
            queries,
            projection_dim=opts["projection_dim"],
            damping=opts["damping"],
            seed=seed,
        )
    if method == "ekfac":
        from daunce_core.baselines.peers import ekfac

        return ekfac(
            model,
            task,
            train,
            queries,
            damping=opts["damping"],
            l2=l2,
            fisher=opts["fisher"],
            measurement=opts["measurement"],
            batch_size=opts["batch_size"],
            seed=seed,
            device=device,
        )
    if method == "tracin":
        _need_recipe(method, make_model, train_config)
        base = make_model(seed)
        checkpoints = fit_checkpoints(
            base, task, train, train_config, l2=l2, seed=seed, count=opts["checkpoints"]
        )
        _check_rebuilt(model, base, task)
        models = [_load(base, state) for state, _ in checkpoints]
        return tracin(
            models, [lr for _, lr in checkpoints], task, train, queries, opts["measurement"]
        )
    # trak_ensemble
    from daunce_core.baselines.peers import trak_scores

    count = int(opts["models"])
    if count < 1:
        raise DaunceError(f"trak_ensemble needs models >= 1; got {count}.")
    if count > 1:
        _need_recipe(method, make_model, train_config)
    ensemble = [model] + [
        fit(make_model(seed + i), task, train, train_config, l2=l2, seed=seed + i)
        for i in range(1, count)
    ]
    return trak_scores(
        ensemble,
        task,
        train,
        queries,
        projection_dim=opts["projection_dim"],
        damping=opts["damping"],
        seed=seed,
        device=device,
    )


def _placed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself on the CPU, else a copy on ``device``."""
    return model if device.type == "cpu" else copy.deepcopy(model).to(device)


def _on(data: ExampleSet, device: torch.device) -> ExampleSet:
    return {name: value.to(device) for name, value in data.items()}


def _need_recipe(method: str, make_model, train_config) -> None:
    if make_model is None or train_config is None:
        raise DaunceError(
            f"baseline {method!r} retrains the model: pass make_model (seed -> fresh model) and "
            "train_config (the TrainConfig the model was trained with)."
        )


def _check_rebuilt(model: nn.Module, rebuilt: nn.Module, task: Task) -> None:
    """Warn if retraining from the recipe did not reproduce ``model``."""
    mine, theirs = dict(model.named_parameters()), dict(rebuilt.named_parameters())
    for name in trainable_names(model, task):
        if name not in theirs or not torch.equal(mine[name].detach(), theirs[name].detach()):
            warnings.warn(
                "TracIn's checkpoints, retrained from make_model(seed) with train_config, do not "
                f"end at the given model (parameter {name!r} differs); the scores describe that "
                "retrained run, not the given model.",
                DaunceWarning,
                stacklevel=3,
            )
            return

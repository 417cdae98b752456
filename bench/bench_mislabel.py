"""Mislabel detection on digits: can each method's self-score find 10% flipped labels?

Data: sklearn digits, the embedded split (1597 training examples,
`daunce_core.evaluation.datasets.digits`).
In every setting 10% of the training labels are wrong (seeded); a model is trained on the noisy
labels, every detector gives each training example one score, and we report

* AUC — the probability that a flipped example scores above a clean one (`metrics.roc_auc`), with
  its Hanley–McNeil standard error in the JSON (0.001 near AUC 1 up to 0.014 when memorised:
  differences between detectors smaller than that are noise of this one draw, although the
  comparison is paired);
* P@10% — the fraction of flipped examples among the top 10% flagged (160 of 1597), what a
  curation pass that relabels the top 10% would fix;
* seconds — wall-clock time of the detector alone, on the model already trained (the machine
  is shared, so timings are indicative).

Settings (labels; training):

* ``uniform`` — the issue's setting, kept as the easy reference: each example flipped with
  probability 0.1 (164 of 1597), to a uniformly random other class.
* ``confusable`` — the same examples, flipped to the class a clean reference model finds most
  likely after the true one: plausible label noise. The reference model is sklearn's
  multinomial logistic regression on the clean labels, with 5-fold out-of-fold probabilities
  (so that its runner-up is not the overconfident one of a model that saw the example).
* ``ambiguous`` — instance-dependent noise: the 160 examples (10%) that the reference model
  finds most confusable (smallest out-of-fold ``p_true − p_runner-up``) are flipped to their
  runner-up class, as annotators err on the confusing images. Clean-but-hard examples now sit
  next to the flipped ones.
* ``memorised`` — the ``uniform`` flips, and an MLP trained until it fits every flipped label
  (SGD lr 0.2, momentum 0.9, batch 64, 300 epochs, L2 1e-5): the training loss no longer flags
  flipped examples by misfit, only by a smaller margin.
* ``memorised ambiguous`` — the ``ambiguous`` flips with the memorising MLP: the hardest case.

Models: softmax regression (64 → 10, 650 parameters) and an MLP (64 → 64 → 10, ReLU, 4810
parameters), both trained by `fit` with SGD (lr 0.1, momentum 0.9, cosine, batch 64, 30
epochs, L2 λ = 1e-3) in the first three settings; the memorised settings use the MLP only
(softmax regression cannot memorise: it fits about 1% of the flipped labels).

Detectors, and each one's self-score of training example ``i`` (higher = more suspicious):

* DAUNCE paper form — ``Var_k L_i(θ^k)``, the variance of the example's loss over K = 128
  perturbed copies (paper defaults: observed labels, r = 0.3, γ = ρ = 1, SGD lr 0.01, 1 epoch).
* DAUNCE flow default — the same variance with the attribute flow's default copies
  (`flows.config.flow_daunce` for the setting's recipe; DESIGN §1): labels sampled from the
  model, r = 1, ρ = 0.1, proximal λ = the base L2, 10 epochs at the recipe's optimiser and
  learning rate, K = 128 (self-influence is the variance whatever the score).
* training loss — ``L_i(θ0)``.
* gradient norm — ``‖∇L_i(θ0)‖²``, the gradient dot product's self-score.
* exact influence — ``(1/n) ∇L_iᵀ (H + λ + δ)⁻¹ ∇L_i`` with the exact Hessian ``H`` of the mean
  training loss (`baselines.influence`'s formula and default damping; the solve in float64):
  ``δ = 2 × max(0, −λ_min(H))``, ≈ 0 for softmax regression (convex: round-off only), but the
  MLP's Hessian is indefinite (from the misfit flipped examples), and an undamped or barely
  damped ``H + λ`` is nearly singular there and ranks by noise. ``δ`` is in the JSON (``fits``).
* TRAK — TRAK's self-score with one model, the diagonal of `baselines.trak` (projection 512):
  ``(1 − p_i) φ_iᵀP (PᵀΦᵀΦP)⁻¹ Pᵀφ_i`` with margin gradients ``φ``.
* EK-FAC — ``(1/n) ∇L_iᵀ (F_EKFAC + δ)⁻¹ ∇L_i`` with kronfluence's EK-FAC Fisher (sampled
  labels) and its default damping (0.1 × each layer's mean eigenvalue): the diagonal of
  `baselines.baseline_scores("ekfac", …)` scoring the training set against itself — in exact
  arithmetic kronfluence's self-score ``∇L_iᵀ P ∇L_i`` (training-loss gradients on both sides, no
  low-rank query approximation), over n.
* TracIn — TracIn-CP self-influence ``Σ_c η_c ‖∇L_i(θ_c)‖²`` over 5 checkpoints evenly spaced
  over the base model's own training (`baselines.fit_checkpoints`, which trains the base model
  bitwise like `fit`; ``η_c`` the mean learning rate of the stretch since the previous
  checkpoint); the diagonal of `baselines.tracin`. Its time excludes the training.

One draw of the flips (seed 0); the flipped examples are the same in ``uniform``,
``confusable`` and ``memorised``.

Usage: ``.venv/bin/python bench/bench_mislabel.py``; writes ``bench/results/mislabel.json``
(a few minutes; one torch thread, see `main`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import replace

import numpy as np
import torch
from common import format_table, machine_info, machine_line, write_results

from daunce_core import ClassificationTask, DaunceConfig, TrainConfig, attribute
from daunce_core.baselines.exact import FlatModel, loss_hessian, per_example_gradients
from daunce_core.baselines.methods import (
    baseline_scores,
    default_damping,
    fit_checkpoints,
    tracin,
    trak,
)
from daunce_core.conversion import from_dict, to_dict
from daunce_core.evaluation.datasets import digits
from daunce_core.evaluation.metrics import roc_auc
from flows.config import flow_daunce

FRACTION = 0.1
STANDARD = {"recipe": TrainConfig(lr=0.1, epochs=30), "l2": 1e-3}
MEMORISE = {"recipe": TrainConfig(lr=0.2, epochs=300), "l2": 1e-5}
SETTINGS = {  # name: (labels, training, models)
    "uniform": ("uniform", STANDARD, ("softmax regression", "MLP 64-64-10")),
    "confusable": ("confusable", STANDARD, ("softmax regression", "MLP 64-64-10")),
    "ambiguous": ("ambiguous", STANDARD, ("softmax regression", "MLP 64-64-10")),
    "memorised": ("uniform", MEMORISE, ("MLP 64-64-10",)),
    "memorised ambiguous": ("ambiguous", MEMORISE, ("MLP 64-64-10",)),
}


def daunce_configs(recipe: TrainConfig) -> dict[str, DaunceConfig]:
    """The paper form, and the attribute flow's default for a model trained with ``recipe``."""
    flow = from_dict(DaunceConfig, flow_daunce(None, to_dict(recipe)), "daunce")
    return {
        "DAUNCE paper form (K=128)": DaunceConfig(num_models=128),
        "DAUNCE flow default (K=128)": replace(flow, num_models=128),
    }


CHECKPOINTS = 5


def noisy_labels(y: np.ndarray, x: np.ndarray, seed: int = 0) -> dict:
    """Each labelling's noisy labels and flipped mask (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    n = len(y)
    rng = np.random.default_rng(seed)
    random_pick = rng.random(n) < FRACTION
    shift = rng.integers(1, 10, size=n)
    probs = cross_val_predict(LogisticRegression(max_iter=2000), x, y, cv=5, method="predict_proba")
    rows = np.arange(n)
    others = probs.copy()
    others[rows, y] = -np.inf
    runner_up = others.argmax(axis=1)
    margin = probs[rows, y] - probs[rows, runner_up]
    ambiguous = np.zeros(n, dtype=bool)
    ambiguous[np.argsort(margin, kind="stable")[: round(FRACTION * n)]] = True
    return {
        "uniform": (np.where(random_pick, (y + shift) % 10, y), random_pick),
        "confusable": (np.where(random_pick, runner_up, y), random_pick),
        "ambiguous": (np.where(ambiguous, runner_up, y), ambiguous),
    }


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "softmax regression":
        return torch.nn.Linear(64, 10)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def as_double(model: torch.nn.Module, data: dict) -> tuple[torch.nn.Module, dict]:
    double = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    return copy.deepcopy(model).double(), double


def exact_influence_self(model, task, data, l2: float) -> tuple[np.ndarray, float]:
    """``(1/n) ∇L_iᵀ (H + λ + δ)⁻¹ ∇L_i`` and the damping ``δ`` it needed (module docstring)."""
    flat = FlatModel(model, task)
    n, size = len(data["y"]), flat.theta.numel()
    hess = loss_hessian(flat, data).double()
    eye = torch.eye(size, dtype=torch.float64)
    damping = default_damping(hess)
    model64, data64 = as_double(model, data)
    grads = per_example_gradients(FlatModel(model64, task), data64, task.loss_from_outputs)
    solved = torch.linalg.solve(hess + (l2 + damping) * eye, grads.T).T
    return ((grads * solved).sum(dim=1) / n).numpy(), damping


def detectors(model, checkpoints, task, train, queries, l2: float, recipe: TrainConfig):
    """Yield ``(detector, self-scores, seconds)``; also a dict of extra facts."""
    facts = {}

    def run(fn):
        start = time.perf_counter()
        scores = fn()
        return np.asarray(scores, dtype=np.float64), time.perf_counter() - start

    for name, config in daunce_configs(recipe).items():
        yield (
            name,
            *run(
                lambda c=config: (
                    attribute(model, task, train, queries, c, base_l2=l2).self_influence
                )
            ),
        )

    def loss():
        with torch.no_grad():
            return task.per_example_loss(model, train).numpy()

    yield ("training loss", *run(loss))

    def grad_norm():
        grads = per_example_gradients(FlatModel(model, task), train, task.loss_from_outputs)
        return (grads**2).sum(dim=1).numpy()

    yield ("gradient norm", *run(grad_norm))

    def exact():
        scores, facts["exact_influence_damping"] = exact_influence_self(model, task, train, l2)
        return scores

    yield ("exact influence", *run(exact))

    def trak_self():
        model64, train64 = as_double(model, train)
        return np.diag(trak(model64, task, train64, train64, projection_dim=512))

    yield ("TRAK (1 model, proj 512)", *run(trak_self))

    def ekfac_self():
        return np.diag(baseline_scores("ekfac", model, task, train, train, l2=l2))

    yield ("EK-FAC (kronfluence)", *run(ekfac_self))

    def tracin_self():
        models = []
        for state, _ in checkpoints:
            clone = copy.deepcopy(model)
            clone.load_state_dict(state)
            models.append(clone.eval())
        rates = [lr for _, lr in checkpoints]
        return np.diag(tracin(models, rates, task, train, train))

    yield (f"TracIn ({CHECKPOINTS} checkpoints)", *run(tracin_self))
    yield ("facts", facts, 0.0)


def auc_se(auc: float, positives: int, negatives: int) -> float:
    """Hanley–McNeil (1982) standard error of an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    return float(np.sqrt(max(var, 0.0) / (positives * negatives)))


def precision_at(scores: np.ndarray, flipped: np.ndarray, fraction: float = FRACTION) -> float:
    top = np.argsort(-scores, kind="stable")[: round(fraction * len(scores))]
    return float(flipped[top].mean())


def main() -> None:
    # One thread: the ops are small, and on a shared 2-core machine two torch threads contend
    # with the other processes (training the MLP took 40-70 s with 2 threads, 0.7 s with one).
    torch.set_num_threads(1)
    started = time.perf_counter()
    train, queries = digits()
    task = ClassificationTask()
    labellings = noisy_labels(train["y"].numpy(), train["x"].numpy())
    rows, fits = [], []
    for setting, (labelling, training, model_names) in SETTINGS.items():
        y, flipped = labellings[labelling]
        noisy = {"x": train["x"], "y": torch.from_numpy(y)}
        for model_name in model_names:
            model = make_model(model_name)
            start = time.perf_counter()
            checkpoints = fit_checkpoints(
                model, task, noisy, training["recipe"], l2=training["l2"], count=CHECKPOINTS
            )
            train_seconds = time.perf_counter() - start
            with torch.no_grad():
                fitted = (model(noisy["x"]).argmax(dim=1) == noisy["y"]).numpy()
                query_acc = (model(queries["x"]).argmax(dim=1) == queries["y"]).float().mean()
            fit_row = {
                "setting": setting,
                "model": model_name,
                "flipped": int(flipped.sum()),
                "train_seconds": train_seconds,
                "fits_flipped_labels": float(fitted[flipped].mean()),
                "fits_clean_labels": float(fitted[~flipped].mean()),
                "query_accuracy": float(query_acc),
            }
            found = detectors(
                model,
                checkpoints,
                task,
                noisy,
                queries,
                training["l2"],
                training["recipe"],
            )
            for name, scores, seconds in found:
                if name == "facts":
                    fit_row.update(scores)
                    continue
                auc = roc_auc(scores, flipped)
                rows.append(
                    {
                        "setting": setting,
                        "model": model_name,
                        "detector": name,
                        "auc": auc,
                        "auc_se": auc_se(auc, int(flipped.sum()), int((~flipped).sum())),
                        "precision_at_10pct": precision_at(scores, flipped),
                        "seconds": seconds,
                    }
                )
                print(
                    f"{setting} / {model_name} / {name}: AUC {auc:.3f} ({seconds:.1f} s)",
                    flush=True,
                )
            fits.append(fit_row)
    total = time.perf_counter() - started
    info = machine_info()
    print()
    print(
        format_table(
            ["setting", "model", "train s", "fits flipped", "fits clean", "query acc", "IF δ"],
            [
                [
                    f["setting"],
                    f["model"],
                    f"{f['train_seconds']:.1f}",
                    f"{f['fits_flipped_labels']:.2f}",
                    f"{f['fits_clean_labels']:.2f}",
                    f"{f['query_accuracy']:.3f}",
                    f"{f['exact_influence_damping']:g}",
                ]
                for f in fits
            ],
        )
    )
    print()
    print(
        format_table(
            ["setting", "model", "detector", "AUC", "P@10%", "seconds"],
            [
                [
                    r["setting"],
                    r["model"],
                    r["detector"],
                    f"{r['auc']:.3f}",
                    f"{r['precision_at_10pct']:.3f}",
                    f"{r['seconds']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    print(f"\n{machine_line(info)}; total {total:.0f} s")
    write_results(
        "mislabel",
        {
            "machine": info,
            "total_seconds": total,
            "fraction": FRACTION,
            "settings": {
                name: {
                    "labels": labelling,
                    "l2": training["l2"],
                    "recipe": dataclasses.asdict(training["recipe"]),
                    "models": list(models),
                }
                for name, (labelling, training, models) in SETTINGS.items()
            },
            "fits": fits,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

"""Mislabel detection: AUC of self-influence at finding 10% flipped labels on digits.

sklearn digits (the embedded split, 1597 train), 10% of the training labels replaced by another
class (seeded). Two models trained on the noisy data: softmax regression (64 → 10) and an MLP
(64 → 64 → 10), L2 1e-3. Each detector ranks training examples; the AUC is the probability that
a flipped example ranks above a clean one.

Detectors: DAUNCE self-influence (variance of each training loss across K copies; the paper's
form, and sampled labels with r = 1, ρ = 0.1), the training loss itself, the squared gradient
norm ``‖∇L_i‖²`` (gradient dot product's self-score), and for softmax regression the exact
influence function's and TRAK's self-scores.

Usage: ``.venv/bin/python bench/bench_mislabel.py``; writes ``bench/results/mislabel.json``.
"""

from __future__ import annotations

import numpy as np
import torch
from common import format_table, machine_info, write_results

from daunce_core import ClassificationTask, DaunceConfig, Objective, TrainConfig, attribute, fit
from daunce_core.baselines import influence, trak
from daunce_core.datasets import digits
from daunce_core.influence import FlatModel, per_example_gradients
from daunce_core.metrics import roc_auc

L2 = 1e-3
DAUNCE = {
    "DAUNCE paper form (K=128)": DaunceConfig(num_models=128),
    "DAUNCE sampled, r=1, rho=0.1, cov (K=128)": DaunceConfig(
        num_models=128,
        subset_ratio=1.0,
        objective=Objective(labels="sampled", rho=0.1),
        score="covariance",
        train=TrainConfig(lr=0.05, epochs=3),
    ),
}


def noisy_digits(fraction: float = 0.1, seed: int = 0):
    train, queries = digits()
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(train["y"])) < fraction
    shift = torch.from_numpy(rng.integers(1, 10, size=len(train["y"])))
    y = torch.where(torch.from_numpy(flipped), (train["y"] + shift) % 10, train["y"])
    return {"x": train["x"], "y": y}, queries, flipped


def models() -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 10)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return {"softmax regression": linear, "MLP 64-64-10": mlp}


def detectors(model, task, train, queries, exact: bool) -> dict:
    found = {}
    for name, config in DAUNCE.items():
        result = attribute(model, task, train, queries, config, base_l2=L2)
        found[name] = result.self_influence
    with torch.no_grad():
        found["training loss"] = task.per_example_loss(model, train).numpy()
    grads = per_example_gradients(FlatModel(model, task), train, task.loss_from_outputs)
    found["gradient norm (grad-dot self)"] = (grads**2).sum(dim=1).numpy()
    if exact:
        double = {k: v.double() if v.is_floating_point() else v for k, v in train.items()}
        model64 = type(model)(64, 10).double()
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        found["exact influence self"] = np.diag(influence(model64, task, double, double, l2=L2))
        found["TRAK self (1 model, proj 256)"] = np.diag(
            trak(model64, task, double, double, projection_dim=256)
        )
    return found


def main() -> None:
    train, queries, flipped = noisy_digits()
    task, rows = ClassificationTask(), []
    for model_name, model in models().items():
        fit(model, task, train, TrainConfig(lr=0.1, epochs=30), l2=L2)
        for name, scores in detectors(
            model, task, train, queries, exact=model_name == "softmax regression"
        ).items():
            rows.append({"model": model_name, "detector": name, "auc": roc_auc(scores, flipped)})
    print(f"digits, {flipped.sum()} of {len(flipped)} training labels flipped")
    print(
        format_table(
            ["model", "detector", "AUC"],
            [[r["model"], r["detector"], f"{r['auc']:.3f}"] for r in rows],
        )
    )
    write_results(
        "mislabel",
        {
            "machine": machine_info(),
            "flipped": int(flipped.sum()),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

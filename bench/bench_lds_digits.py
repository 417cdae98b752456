"""LDS on sklearn digits with a small MLP: DAUNCE variants against baselines, with wall time.

The embedded split (1597 train; the first 100 queries), an MLP 64 → 64 → 10 trained with SGD
(lr 0.1, 30 epochs, batch 64, L2 1e-3). Ground truth: M half-subsets × S seeds retrained with
the same recipe from scratch (all at once with the vectorised trainer); outcome = negated query
loss averaged over seeds. Methods: DAUNCE in the paper's form and in DESIGN §1's forms, the
gradient dot product and TRAK with one model. A first, small version of the evaluation issue's
benchmark (M ≥ 100 and S ≥ 3 there; logistic regression and plots to come).

Usage: ``.venv/bin/python bench/bench_lds_digits.py [--quick]``; writes
``bench/results/lds_digits.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import format_table, machine_info, write_results

from daunce_core import ClassificationTask, DaunceConfig, Objective, TrainConfig, attribute, fit
from daunce_core.baselines import gradient_dot, trak
from daunce_core.datasets import digits
from daunce_core.lds import lds_subsets, linear_datamodeling_score, retrain_on_subsets

L2 = 1e-3
RECIPE = TrainConfig(lr=0.1, epochs=30, batch_size=64)
LONG = TrainConfig(lr=0.05, epochs=3)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def methods(k: int) -> dict:
    return {
        f"DAUNCE paper form, correlation (K={k})": DaunceConfig(num_models=k),
        f"DAUNCE paper form, covariance (K={k})": DaunceConfig(num_models=k, score="covariance"),
        f"DAUNCE observed, r=1, rho=0.1, cov, 3 ep (K={k})": DaunceConfig(
            num_models=k,
            subset_ratio=1.0,
            objective=Objective(rho=0.1),
            score="covariance",
            train=LONG,
        ),
        f"DAUNCE sampled, r=1, rho=0.1, cov, 3 ep (K={k})": DaunceConfig(
            num_models=k,
            subset_ratio=1.0,
            objective=Objective(labels="sampled", rho=0.1),
            score="covariance",
            train=LONG,
        ),
    }


def timed_scores(fn):
    started = time.perf_counter()
    scores = fn()
    return scores, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    subsets_count, seeds, k = (16, 1, 64) if args.quick else (64, 2, 256)
    train, queries = digits()
    queries = {key: value[:100] for key, value in queries.items()}
    task, model = ClassificationTask(), mlp(0)
    fit(model, task, train, RECIPE, l2=L2)
    subsets = lds_subsets(len(train["y"]), subsets_count, seed=0)
    started = time.perf_counter()
    outcomes = retrain_on_subsets(mlp, task, train, queries, subsets, RECIPE, seeds=seeds, l2=L2)
    truth_seconds = time.perf_counter() - started
    candidates = {
        "gradient dot product": lambda: gradient_dot(model, task, train, queries),
        "TRAK, 1 model, proj 512": lambda: trak(model, task, train, queries, projection_dim=512),
        "TRAK, 1 model, proj 2048": lambda: trak(model, task, train, queries, projection_dim=2048),
    }
    for name, config in methods(k).items():
        candidates[name] = lambda c=config: (
            attribute(model, task, train, queries, c, base_l2=L2).scores
        )
    rows = []
    for name, fn in candidates.items():
        scores, seconds = timed_scores(fn)
        lds = linear_datamodeling_score(scores, subsets, outcomes)
        rows.append({"method": name, "lds": lds.mean, "stderr": lds.stderr, "seconds": seconds})
    print(
        f"digits MLP: LDS over M={subsets_count} half-subsets × S={seeds} seeds "
        f"(ground truth {truth_seconds:.0f} s), 100 queries"
    )
    print(
        format_table(
            ["method", "LDS", "± s.e.", "seconds"],
            [
                [r["method"], f"{r['lds']:.3f}", f"{r['stderr']:.3f}", f"{r['seconds']:.1f}"]
                for r in rows
            ],
        )
    )
    write_results(
        "lds_digits_quick" if args.quick else "lds_digits",
        {
            "machine": machine_info(),
            "M": subsets_count,
            "S": seeds,
            "ground_truth_seconds": truth_seconds,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

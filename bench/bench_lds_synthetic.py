"""LDS of DAUNCE variants against the exact influence function on a synthetic problem.

Softmax regression (``daunce_core.evaluation.problems.logistic_regression``: n = 80 train, m = 15
queries,
4 features, 3 classes, L2 1e-2, float64). Ground truth: M subsets of half the training set,
each retrained to convergence (full batch, 300 steps; one seed — the optimum is unique). Scores:
the exact influence function, the gradient dot product, TRAK with one model (projected to 8
dimensions, and at full rank 15 = no projection), and DAUNCE with K copies in the paper's form
(observed labels, r = 0.3, γ = ρ = 1; correlation and covariance) and in the forms DESIGN §1
proposes (r = 1, ρ = 0.1, observed or sampled labels, covariance). A first look ahead of the
full benchmark of the evaluation issue (sklearn digits, more baselines, many more settings).

Usage: ``.venv/bin/python bench/bench_lds_synthetic.py [--quick]``; writes
``bench/results/lds_synthetic.json``.
"""

from __future__ import annotations

import argparse
import time

from common import format_table, machine_info, write_results

from daunce_core import ComputeConfig, DaunceConfig, Objective, TrainConfig, attribute
from daunce_core.baselines.methods import gradient_dot, influence, trak
from daunce_core.evaluation.lds import lds_subsets, linear_datamodeling_score
from daunce_core.evaluation.problems import logistic_regression, retrained_outcomes

BASELINES = {
    "gradient dot product": lambda p: gradient_dot(p.model, p.task, p.train, p.queries),
    "TRAK, 1 model, projection 8": lambda p: trak(
        p.model, p.task, p.train, p.queries, projection_dim=8
    ),
    "TRAK, 1 model, no projection (15)": lambda p: trak(
        p.model, p.task, p.train, p.queries, projection_dim=15
    ),
}
VARIANTS = {
    "paper: observed, r=0.3, correlation": (Objective(), 0.3, "correlation"),
    "paper: observed, r=0.3, covariance": (Objective(), 0.3, "covariance"),
    "observed, r=1, rho=0.1, covariance": (Objective(rho=0.1), 1.0, "covariance"),
    "sampled, r=1, rho=0.1, covariance": (Objective(labels="sampled", rho=0.1), 1.0, "covariance"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    subsets_count, k = (30, 100) if args.quick else (100, 400)
    prob = logistic_regression(n=80, m=15, l2=1e-2)
    subsets = lds_subsets(80, subsets_count, seed=0)

    outcomes = retrained_outcomes(prob, subsets)
    rows = []
    started = time.perf_counter()
    exact_influence = influence(prob.model, prob.task, prob.train, prob.queries, l2=prob.l2)
    lds = linear_datamodeling_score(exact_influence, subsets, outcomes)
    rows.append(
        {
            "method": "exact influence function",
            "K": None,
            "lds": lds.mean,
            "stderr": lds.stderr,
            "seconds": time.perf_counter() - started,
        }
    )
    for name, method in BASELINES.items():
        started = time.perf_counter()
        lds = linear_datamodeling_score(method(prob), subsets, outcomes)
        rows.append(
            {
                "method": name,
                "K": None,
                "lds": lds.mean,
                "stderr": lds.stderr,
                "seconds": time.perf_counter() - started,
            }
        )
    for name, (objective, ratio, score) in VARIANTS.items():
        size = round(ratio * 80)
        config = DaunceConfig(
            num_models=k,
            subset_ratio=ratio,
            objective=objective,
            score=score,
            dtype="float64",
            train=TrainConfig(lr=0.5, steps=150, batch_size=size, schedule="constant"),
        )
        started = time.perf_counter()
        result = attribute(
            prob.model,
            prob.task,
            prob.train,
            prob.queries,
            config,
            base_l2=prob.l2,
            compute=ComputeConfig(group_size=k),
        )
        lds = linear_datamodeling_score(result.scores, subsets, outcomes)
        rows.append(
            {
                "method": f"DAUNCE {name}",
                "K": k,
                "lds": lds.mean,
                "stderr": lds.stderr,
                "seconds": time.perf_counter() - started,
            }
        )
    print(f"softmax regression n=80, m=15; LDS over M={subsets_count} half-subsets")
    print(
        format_table(
            ["method", "K", "LDS", "± s.e.", "seconds"],
            [
                [
                    r["method"],
                    r["K"] or "-",
                    f"{r['lds']:.3f}",
                    f"{r['stderr']:.3f}",
                    f"{r['seconds']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    write_results(
        "lds_synthetic_quick" if args.quick else "lds_synthetic",
        {"machine": machine_info(), "M": subsets_count, "rows": rows},
    )


if __name__ == "__main__":
    main()

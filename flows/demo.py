"""The embedded default job: attribute a small MLP on scikit-learn's digits, in memory.

Trains the base model, runs DAUNCE, and prints the top proponents and opponents of a few queries
and the training examples with the highest self-influence.
"""

from __future__ import annotations

import time

import numpy as np

from daunce_core import ClassificationTask, DaunceConfig, TrainConfig, attribute, fit
from daunce_core.datasets import digits, mlp

BASE_L2 = 1e-3


def _table(pairs, labels) -> str:
    return ", ".join(f"#{i} (label {labels[i]}, {s:+.3f})" for i, s in pairs)


def run_demo(num_models: int = 128, queries_shown: int = 3, seed: int = 0) -> dict:
    """Run the demo; return its timings and the top-proponent label agreement."""
    train, queries = digits(seed=seed)
    task, model = ClassificationTask(), mlp(seed=seed)
    started = time.perf_counter()
    fit(model, task, train, TrainConfig(lr=0.1, epochs=30), l2=BASE_L2, seed=seed)
    fitted = time.perf_counter()
    config = DaunceConfig(num_models=num_models, seed=seed)
    result = attribute(model, task, train, queries, config, base_l2=BASE_L2)
    done = time.perf_counter()
    labels, query_labels = train["y"].numpy(), queries["y"].numpy()
    print(f"base model: {len(labels)} digits, trained in {fitted - started:.1f}s")
    print(
        f"DAUNCE: K={num_models} perturbed copies, {len(query_labels)} queries, "
        f"{done - fitted:.1f}s\n"
    )
    for j in range(queries_shown):
        print(f"query {j} (label {query_labels[j]})")
        print("  proponents:", _table(result.top_proponents(j, 5), labels))
        print("  opponents: ", _table(result.top_opponents(j, 5), labels))
    flagged = np.argsort(-result.self_influence)[:5]
    print(
        "\nhighest self-influence (candidates for review):",
        ", ".join(f"#{i} (label {labels[i]})" for i in flagged),
    )
    top = np.argsort(-result.scores, axis=0)[:10]
    agreement = float((labels[top] == query_labels[None]).mean())
    print(f"top-10 proponents sharing the query's label: {agreement:.1%}")
    return {
        "fit_seconds": fitted - started,
        "daunce_seconds": done - fitted,
        "label_agreement": agreement,
    }

"""What the README's Python example's proponents look like under each score kind.

The README example (sklearn digits: the first 1500 examples train an MLP 64 → 64 → 10 with SGD
lr 0.1, 30 epochs, L2 1e-3; the other 297 are queries), attributed with the default
(`DaunceConfig()`: subspace scores), the same copies scored by covariance, and the paper's form
(`DaunceConfig.paper(num_models=128)`: correlation). For each: wall-clock seconds of
`attribute` (one run; this machine is shared, compare within one run) and the fraction of each
query's top-5 proponents that carry the query's label (10% by chance). This is not an accuracy
measure (the LDS is: `bench/bench_defaults.py`); it shows what a user reading the proponents
sees: the influence function ranks the examples whose removal moves the query's loss most,
which include high-loss examples of other classes, where correlation favours typical examples
of the query's class.

Usage: ``.venv/bin/python bench/bench_proponents.py``; writes
``bench/results/proponents_cpu.json``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from common import format_table, machine_info, machine_line, write_results
from sklearn.datasets import load_digits

from daunce_core import ClassificationTask, DaunceConfig, TrainConfig, attribute, fit


def main() -> None:
    warnings.simplefilter("ignore")
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    train, queries = {"x": x[:1500], "y": y[:1500]}, {"x": x[1500:], "y": y[1500:]}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    task = ClassificationTask()
    fit(model, task, train, TrainConfig(lr=0.1, epochs=30), l2=1e-3)
    configs = {
        "default (subspace, K = 256)": DaunceConfig(),
        "default copies, covariance": DaunceConfig(score="covariance"),
        "paper form (correlation, K = 128)": DaunceConfig.paper(num_models=128),
    }
    rows, results = [], []
    for label, config in configs.items():
        started = time.perf_counter()
        result = attribute(model, task, train, queries, config, base_l2=1e-3)
        seconds = time.perf_counter() - started
        top = np.argsort(-result.scores, axis=0, kind="stable")[:5]
        agree = float((train["y"].numpy()[top] == queries["y"].numpy()[None]).mean())
        results.append({"label": label, "seconds": seconds, "top5_same_label": agree})
        rows.append([label, f"{seconds:.1f}", f"{agree:.3f}"])
    info = machine_info()
    print(machine_line(info))
    print(format_table(["attribution", "seconds", "top-5 proponents with the query's label"], rows))
    write_results("proponents_cpu", {"machine": info, "results": results})


if __name__ == "__main__":
    main()

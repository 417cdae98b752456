"""Benchmark batched (``vmap``) against one-at-a-time training of DAUNCE's K perturbed copies.

Model: an MLP 64 → 64 → 10 (ReLU) on sklearn digits (pixels / 16, float32; a seeded shuffle,
1500 training examples, the other 297 as queries), trained with
``daunce_core.fit(..., TrainConfig(lr=0.1, epochs=30, batch_size=64), l2=1e-3)``.

Measured: ``TorchModuleAccess(model, task, train, queries, DaunceConfig(num_models=K,
dtype=D, train=TrainConfig(lr=0.01, epochs=1, batch_size=64)), compute=ComputeConfig(group_size=G,
vectorize=V))
base_l2=1e-3).run(range(K))`` at K = 64 (other settings at their defaults: hessian variant,
observed labels, r = 0.3, so each copy takes 8 SGD steps on its 450 examples and is then
evaluated on all 1500 + 297 examples), for

* ``vectorize=False``, G = 1: each copy trained alone, start to finish (the reference);
* ``vectorize=False``, G = K: copies stepped in lockstep, forward passes one after another;
* ``vectorize=True`` with G in {8, 32, 64}, float32;
* ``vectorize=True``, G = 32, float64.

Each configuration: one warm-up run, then the median of 3 timed runs of ``run`` (the
constructor, which computes the base signals once, is timed separately). The timed runs are
interleaved — each round times every configuration once, in a rotated order — so that load from
other processes spreads over all configurations; the minimum is reported too. Reported: seconds
per run and per copy, the speed-up over the reference (each copy alone) measured in the same
process, and the max |difference| of the train and query losses against the reference (same
copies, so they must agree to float tolerance). Training and evaluation are also timed apart
(median of 3), by calling ``TorchModuleAccess.train`` and ``TorchModuleAccess.evaluate`` group
by group, as ``TorchModuleAccess.run`` does.

Usage: ``.venv/bin/python bench/bench_training.py [--quick] [--repeats N]`` (``--quick``: K = 8,
one timed run); writes ``bench/results/training.json`` (``training_quick.json`` with ``--quick``).
Threads are left as torch sets them (printed in the header). Run it on a quiet machine: on 2
cores another busy process slowed every setting here by 5-15x, and unevenly.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from common import format_table, machine_info, machine_line, median, timed, write_results
from torch import nn

from daunce_core import (
    ClassificationTask,
    ComputeConfig,
    DaunceConfig,
    TorchModuleAccess,
    TrainConfig,
    fit,
)
from daunce_core.evaluation.datasets import digits as embedded_digits

BASE_L2 = 1e-3
BASE_TRAIN = TrainConfig(lr=0.1, epochs=30, batch_size=64)
COPY_TRAIN = TrainConfig(lr=0.01, epochs=1, batch_size=64)


@dataclass(frozen=True)
class Setting:
    """One timed configuration of `TorchModuleAccess`."""

    vectorize: bool
    group_size: int
    dtype: str = "float32"

    @property
    def label(self) -> str:
        if not self.vectorize and self.group_size == 1:
            return f"alone G=1 {self.dtype}"
        mode = "vmap" if self.vectorize else "loop"
        return f"{mode} G={self.group_size} {self.dtype}"


def settings(k: int, quick: bool) -> list[Setting]:
    """The reference first — each copy trained alone, start to finish — then the others.

    ``loop G=K`` steps all copies in lockstep with one optimiser but runs their forward passes
    one after another; ``vmap`` runs them at once.
    """
    groups = [2, 8] if quick else [8, 32, 64]
    vectorised = [Setting(True, g) for g in groups if g <= k]
    return [
        Setting(False, 1),
        Setting(False, k),
        *vectorised,
        Setting(True, min(32, k), "float64"),
    ]


def digits(seed: int = 0) -> tuple[dict, dict]:
    """The embedded digits data: 1500 train, the rest (297) queries."""
    return embedded_digits(num_queries=297, seed=seed)


def base_model(train: dict, queries: dict, task: ClassificationTask) -> tuple[nn.Module, dict]:
    """The MLP trained by `daunce_core.fit`, with its fit time and accuracies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    start = time.perf_counter()
    fit(model, task, train, BASE_TRAIN, l2=BASE_L2)
    info = {"fit_seconds": time.perf_counter() - start}
    with torch.no_grad():
        for name, data in (("train", train), ("query", queries)):
            correct = model(data["x"]).argmax(dim=1) == data["y"]
            info[f"{name}_accuracy"] = float(correct.float().mean())
    return model, info


def make_copies(model, task, train, queries, k: int, setting: Setting) -> TorchModuleAccess:
    config = DaunceConfig(num_models=k, dtype=setting.dtype, train=COPY_TRAIN)
    compute = ComputeConfig(group_size=setting.group_size, vectorize=setting.vectorize)
    return TorchModuleAccess(model, task, train, queries, config, base_l2=BASE_L2, compute=compute)


def groups_of(copies: TorchModuleAccess, k: int) -> list[list[int]]:
    size = copies.compute.group_size
    return [list(range(k))[i : i + size] for i in range(0, k, size)]


def train_phase(copies: TorchModuleAccess, ks: list[int]):
    """Training alone: `TorchModuleAccess.train` on copies ``ks``."""
    return copies.train(ks)


def eval_phase(copies: TorchModuleAccess, ks: list[int], trained):
    """Evaluation alone: `TorchModuleAccess.evaluate` of the trained copies ``ks``."""
    return copies.evaluate(ks, trained)


class Timed:
    """One setting's copies and its timings, filled round by round."""

    def __init__(self, model, task, train, queries, k: int, setting: Setting) -> None:
        start = time.perf_counter()
        self.copies = make_copies(model, task, train, queries, k, setting)
        self.setup_seconds = time.perf_counter() - start
        self.setting, self.k = setting, k
        self.times: dict[str, list[float]] = {"run": [], "train": [], "eval": []}
        self.rows = self.copies.run(range(k))  # warm-up; keeps the rows
        self.trained = self._train()  # warm-up; its parameters feed the timed evaluations

    def _train(self) -> list:
        return [(ks, train_phase(self.copies, ks)) for ks in groups_of(self.copies, self.k)]

    def _eval(self) -> list:
        return [eval_phase(self.copies, ks, trained) for ks, trained in self.trained]

    def _run(self) -> None:
        self.rows = self.copies.run(range(self.k))

    def time_round(self) -> None:
        """Time ``run`` once, training alone once and evaluation alone once."""
        self.times["run"] += timed(self._run, 1)
        self.times["train"] += timed(self._train, 1)
        self.times["eval"] += timed(self._eval, 1)

    def report(self) -> dict:
        """Timings (all runs and medians) and the split-versus-run consistency check."""
        split = np.concatenate([rows.train for rows in self._eval()])
        row = {"setting": asdict(self.setting) | {"label": self.setting.label}}
        row.update(setup_seconds=self.setup_seconds, run_seconds=self.times["run"])
        row.update(train_phase_seconds=self.times["train"], eval_phase_seconds=self.times["eval"])
        row.update(median_seconds=median(self.times["run"]), min_seconds=min(self.times["run"]))
        row.update(
            train_seconds=median(self.times["train"]), eval_seconds=median(self.times["eval"])
        )
        row["split_matches_run"] = max_abs_diff(split, self.rows.train)
        return row


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def compare(rows, reference) -> dict:
    """Max |difference| of the loss rows against the reference run, and divergence counts."""
    return {
        "max_abs_diff_train": max_abs_diff(rows.train, reference.train),
        "max_abs_diff_query": max_abs_diff(rows.query, reference.query),
        "diverged": int(rows.diverged.sum()),
    }


def bench(k: int, repeats: int, quick: bool) -> dict:
    """Warm every setting up, then time them in ``repeats`` interleaved rounds.

    Interleaving (each round times every setting once, in a rotated order) spreads any load from
    other processes over all settings instead of letting it land on one of them.
    """
    task = ClassificationTask()
    train, queries = digits()
    model, base = base_model(train, queries, task)
    runs = [Timed(model, task, train, queries, k, s) for s in settings(k, quick)]
    for r in range(repeats):
        for item in runs[r % len(runs) :] + runs[: r % len(runs)]:
            item.time_round()
        print(f"  round {r + 1}/{repeats} done", flush=True)
    reference = runs[0]
    results = {"K": k, "repeats": repeats, "warmup": 1, "base_model": base, "rows": []}
    results["copy_spread_train"] = float(np.nanmean(np.nanstd(reference.rows.train, axis=0)))
    reference_seconds = median(reference.times["run"])
    for item in runs:
        row = item.report() | compare(item.rows, reference.rows)
        row["seconds_per_copy"] = row["median_seconds"] / k
        row["speedup"] = reference_seconds / row["median_seconds"]
        results["rows"].append(row)
    return results


def table(results: dict) -> str:
    headers = ["setting", "run s", "min s", "s/copy", "speed-up", "train s", "eval s"]
    headers += ["max|Δ| train", "max|Δ| query"]
    body = [
        [
            row["setting"]["label"],
            f"{row['median_seconds']:.3f}",
            f"{row['min_seconds']:.3f}",
            f"{row['seconds_per_copy'] * 1e3:.2f} ms",
            f"{row['speedup']:.2f}x",
            f"{row['train_seconds']:.3f}",
            f"{row['eval_seconds']:.3f}",
            f"{row['max_abs_diff_train']:.1e}",
            f"{row['max_abs_diff_query']:.1e}",
        ]
        for row in results["rows"]
    ]
    return format_table(headers, body)


def header(results: dict) -> str:
    base = results["base_model"]
    return "\n".join(
        [
            f"machine: {machine_line(results['machine'])}",
            f"torch.get_num_threads() = {results['machine']['torch_threads']}",
            f"base MLP 64-64-10: fit {base['fit_seconds']:.1f} s, train acc "
            f"{base['train_accuracy']:.3f}, query acc {base['query_accuracy']:.3f}",
            f"K = {results['K']} copies, r = 0.3, 1 epoch, batch 64; median of "
            f"{results['repeats']} interleaved runs after 1 warm-up",
            "speed-up and max|Δ| against the first row (each copy trained alone)",
            f"spread of the train losses across copies (mean std): "
            f"{results['copy_spread_train']:.1e}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 8, one timed run")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 3; 1 with --quick)")
    args = parser.parse_args()
    k, repeats = (8, 1) if args.quick else (64, 3)
    repeats = args.repeats or repeats
    print(f"torch.get_num_threads() = {torch.get_num_threads()}", flush=True)
    results = {"quick": args.quick, "machine": machine_info(), **bench(k, repeats, args.quick)}
    path = write_results("training_quick" if args.quick else "training", results)
    print()
    print(header(results))
    print()
    print(table(results))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()

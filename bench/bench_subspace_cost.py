"""Where the default's time goes, against EK-FAC's, on the MLP benchmarks (issue 14's 10× goal).

For each benchmark (`bench/benchmarks.py`; default: digits-mlp and adam-mlp) and each K, the
default `DaunceConfig()` (SGD at ``lr: auto``, one epoch, subspace scores) is run in its stages —
the curvature step (``lr: auto``), copy training (groups of ``compute.group_size``), measuring
the copies, their reflections and θ0 with ``Q`` (`TorchModuleAccess.measure_reflected`), the
scores — and EK-FAC (kronfluence, `daunce_core.baselines`) is run in the same process, in
``--repeats`` interleaved rounds (each round runs every setting once). The table gives medians of
wall-clock seconds, the LDS of the last round (deterministic: the same every round), and the
ratio of the default's total to EK-FAC's. torch uses 1 thread (``--threads``).

Usage: ``.venv/bin/python bench/bench_subspace_cost.py [--benchmarks a,b] [--ks 100,200]
[--repeats 3] [--threads 1]``; writes ``bench/results/subspace_cost_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import load
from common import machine_info, machine_line

from daunce_core import DaunceConfig
from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.access.torch_module.subspace import merge_trained
from daunce_core.baselines.methods import baseline_scores
from daunce_core.method.subspace import subspace_scores

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("lr", "train", "measure", "scores")


def run_default(bench, k: int) -> tuple[dict, object]:
    """Seconds of each stage of the default at ``k`` copies, and its scores."""
    seconds = {}
    started = time.perf_counter()
    access = TorchModuleAccess(
        bench.model, bench.task, bench.train, bench.queries, DaunceConfig(num_models=k),
        base_l2=bench.l2,
    )  # fmt: skip
    access.recipe()
    seconds["lr"] = time.perf_counter() - started
    started = time.perf_counter()
    size = access.compute.group_size
    trained = merge_trained(
        [access.train(list(range(i, min(k, i + size)))) for i in range(0, k, size)]
    )
    seconds["train"] = time.perf_counter() - started
    started = time.perf_counter()
    parts = access.measure_reflected(trained)
    seconds["measure"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = subspace_scores(parts.train.central(), parts.query.central(), parts.curvature)
    seconds["scores"] = time.perf_counter() - started
    return seconds, scores


def run_ekfac(bench) -> tuple[dict, object]:
    started = time.perf_counter()
    scores = baseline_scores(
        "ekfac", bench.model, bench.task, bench.train, bench.queries, l2=bench.l2
    )
    return {"total": time.perf_counter() - started}, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", default="digits-mlp,adam-mlp")
    parser.add_argument("--ks", default="100,200")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    info = machine_info()
    print(machine_line(info), flush=True)
    ks = [int(k) for k in args.ks.split(",")]
    results = {"machine": info, "threads": args.threads, "repeats": args.repeats, "rows": []}
    for name in args.benchmarks.split(","):
        bench = load(name)
        settings = [("ekfac", None)] + [("default", k) for k in ks]
        timings = {s: [] for s in settings}
        lds = {}
        for round_ in range(args.repeats):
            order = settings[round_ % len(settings) :] + settings[: round_ % len(settings)]
            for setting in order:
                method, k = setting
                seconds, scores = run_ekfac(bench) if k is None else run_default(bench, k)
                timings[setting].append(seconds)
                lds[setting] = bench.lds(scores)
        ekfac = statistics.median(t["total"] for t in timings[("ekfac", None)])
        for setting in settings:
            method, k = setting
            stages = {
                stage: statistics.median(t[stage] for t in timings[setting])
                for stage in timings[setting][0]
            }
            total = statistics.median(sum(t.values()) for t in timings[setting])
            row = {
                "benchmark": name,
                "method": method,
                "K": k,
                "lds": lds[setting][0],
                "stderr": lds[setting][1],
                "seconds": total,
                "stages": stages,
                "ratio_to_ekfac": total / ekfac,
            }
            results["rows"].append(row)
    print(f"\n{'benchmark':<12} {'method':<8} {'K':>4} {'LDS':>6} {'total s':>8} "
          f"{'÷ EK-FAC':>8}  stages (median s)")  # fmt: skip
    for row in results["rows"]:
        stages = " ".join(f"{s} {v:.2f}" for s, v in row["stages"].items())
        k = "" if row["K"] is None else row["K"]
        print(
            f"{row['benchmark']:<12} {row['method']:<8} {k!s:>4} {row['lds']:>6.3f} "
            f"{row['seconds']:>8.2f} {row['ratio_to_ekfac']:>8.1f}  {stages}"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "subspace_cost_cpu.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

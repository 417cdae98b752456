"""Subspace-curvature scores against covariance and correlation, from the same copies (LDS).

The benchmark of `bench/bench_lds.py` (`prepare`: sklearn digits, 1597 training examples, 200
queries; the same base models, recipes and cached ground truth: M random half-subsets × S seeds
retrained from scratch, outcome the negated query loss), for its two models:

* ``logreg`` — softmax regression 64 → 10 (650 parameters), convex;
* ``mlp`` — 64 → 64 → 10, ReLU (4810 parameters).

Copies: the attribute flow's default (`bench_lds.default_config`: hessian objective with sampled
labels, r = 1, ρ = 0.1, 10 epochs at the recipe's optimiser and learning rate, proximal λ = the
base L2 = 1e-3, float32), trained once up to the largest K in groups ending at every K of the
curve (at most 200 copies a group). At each K the first K copies give every score:

* ``covariance`` / ``correlation``: paper eq. (6) on the trained copies' losses (`evaluate`);
* ``subspace``: ``(1/n) Aᵀ Q⁺ B`` (`daunce_core.method.subspace`) with central differences from
  the reflected copies θ0 − Δ_k and Q from the central logit changes (`measure_reflected`),
  eigenvalues below ``DEFAULT_RTOL`` of the largest truncated;
* ``subspace one-sided``: the same with ``A = L(θ^k) − L(θ0)`` (no reflection; Q unchanged);
* ``subspace rtol=…``: the truncation threshold swept (LDS only).

Seconds at K: the training of the first K copies (cumulative over the groups) plus, for
covariance and correlation, their loss evaluation and scoring; for the subspace scores the
reflected pass (2K copies' losses and the Gram) and the scoring instead. One measured run each,
wall-clock, on a shared 2-core machine: compare times within one run only. Baselines
(`daunce_core.baselines.methods`, one run each): gradient dot product, the exact influence
function (exact Hessian + δ, the pipeline's default δ = 2·|λ_min|, 0 for a convex model), EK-FAC
via kronfluence (its default damping).

Usage: ``.venv/bin/python bench/bench_subspace.py [--quick] [--models logreg,mlp] [--subsets M]
[--seeds S]`` (default M = 100, S = 3, bench_lds's ground truth, shared through its cache); writes
``bench/results/subspace_cpu.json`` (``--quick``: M = 20, S = 1, small K, written under
``bench/results/cache/`` only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
from bench_lds import CACHE, MODELS, TASK, default_config, prepare
from common import format_table, machine_info, machine_line, write_results

from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.access.torch_module.subspace import merge_trained
from daunce_core.baselines.methods import baseline_scores
from daunce_core.conversion import to_dict
from daunce_core.method.config import ComputeConfig
from daunce_core.method.scores import collect_statistics, write_scores
from daunce_core.method.subspace import DEFAULT_RTOL, curvature_pinv, subspace_scores

GROUP_CAP = 200
RTOLS = (1e-2, 1e-4, 1e-8, 0.0)
CURVES = {
    "logreg": (25, 50, 100, 200, 400, 800),
    "mlp": (25, 50, 100, 200, 400, 800),
}
BASELINES = (
    ("gradient dot product", "gradient_dot", {}),
    ("influence, exact Hessian, δ=2·|λ_min|", "influence", {}),
    ("EK-FAC (kronfluence), default damping", "ekfac", {}),
)


def now() -> np.ndarray:
    """Wall-clock and CPU (user + system of this process) seconds, as one array."""
    return np.array([time.perf_counter(), time.process_time()])


def run_baselines(bench) -> list[dict]:
    """LDS, wall-clock and CPU seconds of each baseline, one run each."""
    rows = []
    for label, method, options in BASELINES:
        started = now()
        scores = baseline_scores(
            method,
            bench.model,
            TASK,
            bench.train,
            bench.queries,
            l2=bench.spec.l2,
            options=options,
        )
        seconds = now() - started
        lds, stderr = bench.lds(scores)
        rows.append(
            {
                "label": label,
                "lds": lds,
                "stderr": stderr,
                "seconds": seconds[0],
                "cpu_seconds": seconds[1],
            }
        )
        print(f"  {label}: LDS {lds:.3f} ({seconds[0]:.1f} s)", flush=True)
    return rows


def train_curve(copies: TorchModuleAccess, ks: tuple[int, ...]):
    """All copies up to ``max(ks)``, and the cumulative training (wall, CPU) seconds at each K."""
    groups, seconds, done, total = [], {}, 0, np.zeros(2)
    for k_target in sorted(ks):
        while done < k_target:
            group = list(range(done, min(k_target, done + GROUP_CAP)))
            started = now()
            groups.append(copies.train(group))
            total = total + now() - started
            done = group[-1] + 1
        seconds[k_target] = total
    return merge_trained(groups), seconds


def prefix(trained, k: int):
    """The first ``k`` copies of ``trained``."""
    return replace(
        trained,
        params={name: p[:k] for name, p in trained.params.items()},
        diverged=trained.diverged[:k],
        final_objective=trained.final_objective[:k],
    )


def point(bench, k, score, scores, seconds=None, **extra) -> dict:
    """One LDS point; ``seconds``: (wall, CPU) or None (untimed: a variant of a timed score)."""
    lds, stderr = bench.lds(scores)
    timing = {} if seconds is None else {"seconds": seconds[0], "cpu_seconds": seconds[1]}
    return {"K": k, "score": score, "lds": lds, "stderr": stderr, **timing, **extra}


def moment_points(bench, copies, trained, k, train_seconds) -> list[dict]:
    """Covariance and correlation of the first ``k`` copies (their loss evaluation timed)."""
    started = now()
    rows = copies.evaluate(list(range(k)), trained)
    evaluated = now() - started
    points = []
    for kind in ("covariance", "correlation"):
        started = now()
        scores = write_scores(
            rows.train, rows.query, collect_statistics(rows.train, rows.query), kind=kind
        )
        seconds = train_seconds + evaluated + now() - started
        points.append(point(bench, k, kind, scores, seconds))
    return points


def subspace_points(bench, copies, trained, k, train_seconds) -> list[dict]:
    """Subspace scores of the first ``k`` copies: central (timed), one-sided, rtol sweep."""
    started = now()
    parts = copies.measure_reflected(trained)
    valid = parts.finite_rows() & ~np.asarray(trained.diverged)
    a, b = parts.train.central()[valid], parts.query.central()[valid]
    q = parts.curvature[np.ix_(valid, valid)]
    scores = subspace_scores(a, b, q)
    seconds = train_seconds + now() - started
    _, rank = curvature_pinv(q)
    points = [point(bench, k, "subspace", scores, seconds, rank=rank, valid=int(valid.sum()))]
    one_sided = subspace_scores(parts.train.one_sided()[valid], parts.query.one_sided()[valid], q)
    points.append(point(bench, k, "subspace one-sided", one_sided))
    for rtol in RTOLS:
        swept = subspace_scores(a, b, q, rtol=rtol)
        points.append(point(bench, k, f"subspace rtol={rtol:g}", swept))
    return points


def run_model(name: str, quick: bool, count: int, seeds: int) -> dict:
    spec = MODELS[name]
    bench, info = prepare(spec, count, seeds)
    print(
        f"\n{name}: {info['parameters']} parameters; ground truth M={count} × S={seeds} "
        f"({info['ground_truth']['seconds']:.0f} s"
        f"{', cached' if info['ground_truth']['cached'] else ''})",
        flush=True,
    )
    info["baselines"] = run_baselines(bench)
    ks = (25, 50) if quick else CURVES[name]
    config = replace(default_config(spec), num_models=max(ks))
    info["config"] = to_dict(config)
    copies = TorchModuleAccess(
        bench.model,
        TASK,
        bench.train,
        bench.queries,
        config,
        base_l2=spec.l2,
        compute=ComputeConfig(group_size=GROUP_CAP),
    )
    trained, train_seconds = train_curve(copies, ks)
    info["points"] = []
    for k in ks:
        first = prefix(trained, k)
        points = moment_points(bench, copies, first, k, train_seconds[k])
        points += subspace_points(bench, copies, first, k, train_seconds[k])
        info["points"] += points
        shown = ", ".join(f"{p['score']} {p['lds']:.3f}" for p in points[:3])
        print(f"  K={k}: {shown} (rank {points[2]['rank']})", flush=True)
    return info


def curve_table(info: dict) -> str:
    ks = sorted({p["K"] for p in info["points"]})
    scores = list(dict.fromkeys(p["score"] for p in info["points"]))
    rows = []
    for score in scores:
        by_k = {p["K"]: p for p in info["points"] if p["score"] == score}
        rows.append([score, *(_cell(by_k.get(k)) for k in ks)])
    return format_table(["score", *(f"K={k}" for k in ks)], rows)


def baseline_table(info: dict) -> str:
    rows = [
        [b["label"], f"{b['lds']:.3f}", f"{b['stderr']:.3f}", f"{b['seconds']:.2f}"]
        for b in info["baselines"]
    ]
    return format_table(["baseline", "LDS", "± s.e.", "seconds"], rows)


def _cell(p: dict | None) -> str:
    if p is None:
        return "-"
    if "seconds" not in p:
        return f"{p['lds']:.3f}"
    return f"{p['lds']:.3f} ({p['seconds']:.1f}s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--models", default="logreg,mlp", help="comma-separated: logreg,mlp")
    parser.add_argument("--subsets", type=int, default=100, help="ground truth: M subsets")
    parser.add_argument("--seeds", type=int, default=3, help="ground truth: S seeds a subset")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    info = machine_info()
    print(machine_line(info), flush=True)
    output = {
        "machine": info,
        "command": " ".join([".venv/bin/python", "bench/bench_subspace.py", *sys.argv[1:]]),
        "quick": args.quick,
        "default_rtol": DEFAULT_RTOL,
        "notes": __doc__,
        "models": {},
    }
    for name in args.models.split(","):
        count, seeds = (20, 1) if args.quick else (args.subsets, args.seeds)
        output["models"][name] = run_model(name, args.quick, count, seeds)
    output["total_seconds"] = time.perf_counter() - started
    for name, model in output["models"].items():
        print(f"\n{name} ({model['parameters']} parameters): LDS (seconds) against K")
        print(curve_table(model))
        print(baseline_table(model))
    if args.quick:
        path = CACHE / "subspace_quick.json"
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2) + "\n")
    else:
        path = write_results("subspace_cpu", output)
    print(f"\nwrote {path}; total {output['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()

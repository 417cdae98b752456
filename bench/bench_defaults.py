"""Defaults by the worst case: DAUNCE candidate configurations on every benchmark (LDS, seconds).

What: for every benchmark of `bench/benchmarks.py` (digits softmax regression, digits MLP,
digits CNN, a synthetic AdamW-trained MLP, diabetes regression; each with its base model, recipe
and cached ground truth: M random half-subsets × S seeds retrained from scratch, outcome the
negated query loss), the LDS and wall-clock seconds of

* baselines (`daunce_core.baselines.methods.baseline_scores`, one run each): the gradient dot
  product, the exact influence function (exact Hessian + the pipeline's default δ = 2·|λ_min|;
  skipped above `INFLUENCE_MAX_PARAMETERS` parameters) and EK-FAC via kronfluence (its default
  damping);
* every DAUNCE candidate of `CANDIDATES` (a name and a function benchmark → `DaunceConfig`),
  along a curve of K, each scored three ways from the same copies: ``covariance`` and
  ``correlation`` (paper eq. (6)) and ``subspace`` (``(1/n) Aᵀ Q⁺ B`` from the copies and their
  reflections, `daunce_core.method.subspace`).

The worst-case table then gives, for each (candidate, score, K), the minimum over benchmarks of
LDS / best baseline's LDS and the minimum raw LDS: a default should be chosen by it, not by one
benchmark. Candidates (each stable in meaning except ``flow``, which follows the code):

* ``paper`` — `DaunceConfig.paper` (``DaunceConfig()`` before 53b6f23): the paper's form
  (hessian, observed labels, r = 0.3, γ = ρ = 1, SGD momentum 0.9, lr 0.01, 1 epoch, batch 64);
* ``flow`` — the attribute flow's default for the benchmark's recipe at the code's commit
  (`flows.config.flow_daunce`; since 53b6f23 ``DaunceConfig()``: sampled labels, r = 1,
  ρ = 0.1, one epoch of SGD at ``lr: auto``);
* ``inherit`` — the flow's default before 53b6f23: sampled labels, r = 1, ρ = 0.1, 10 epochs,
  batch 64, the base model's own optimiser and learning rate (AdamW lr 1e-3 on ``adam-mlp``);
* ``sgd-fixed`` — ``inherit`` with a fixed recipe: SGD momentum 0.9, lr 0.01, 20 epochs,
  batch 128;
* ``flow-2ep``, ``flow-5ep``, ``flow-10ep``, ``flow-rho0.03``, ``flow-rho1`` — ``flow`` with one
  lever moved (its copies' epochs, or ρ); run at one K, e.g. ``--ks 100``.

A candidate is one entry of `CANDIDATES`; one whose configuration or run raises is reported and
skipped (its error kept in the JSON), never fatal.

How: `TorchModuleAccess` as `bench/bench_subspace.py` uses it: each candidate's copies are
trained once up to the largest K, in groups of at most 200 ending at every K of the curve
(`bench_subspace.train_curve`; the learning rate, the value ``lr: "auto"`` finds, is kept),
and the first K copies are scored at each K
(`bench_subspace.prefix`). Seconds at K (cumulative): the access's set-up (copy of θ0, base
signals) + the training of the first K copies + for covariance and correlation their loss
evaluation and scoring, for subspace the reflected pass (`measure_reflected`: 2K copies' losses
and the curvature Q) and the scoring. The base model's own training and the ground truth are
nobody's cost. One measured run each, wall-clock, torch on one thread, on a shared 2-core
machine: compare seconds within one invocation (the JSON keeps each entry's timestamp and load
average).

Results merge by (benchmark, candidate) into ``bench/results/defaults_cpu.json``: separate
invocations with different ``--benchmarks`` / ``--candidates`` accumulate; a benchmark's
baselines are run when missing (or with ``--rerun-baselines``); entries of a benchmark whose
ground truth (M, S) changed are dropped. Plot: ``bench/results/defaults_cost_accuracy.png``, one
panel per benchmark, LDS against seconds (log), each candidate × score a line over K, the
baselines as markers.

Usage: ``.venv/bin/python bench/bench_defaults.py [--benchmarks a,b] [--candidates x,y]
[--ks 25,50,100,200,400] [--subsets M] [--seeds S] [--rerun-baselines] [--quick]
[--plot-only]``. ``--quick`` is a smoke run (two small benchmarks unless ``--benchmarks``,
K = 10, 20, no exact influence) written under ``bench/results/cache/`` only; ``--plot-only``
redraws the PNG from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from benchmarks import BENCHMARKS, Benchmark, agreement, load
from common import RESULTS, ROOT, format_table, machine_info, machine_line, write_results

from daunce_core import DaunceConfig, Objective, TrainConfig
from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.baselines.methods import baseline_scores
from daunce_core.conversion import from_dict, to_dict
from daunce_core.method.config import ComputeConfig
from daunce_core.method.scores import collect_statistics, write_scores
from daunce_core.method.subspace import subspace_scores
from flows.config import flow_daunce

CACHE = RESULTS / "cache"
NAME = "defaults_cpu"
PLOT = "defaults_cost_accuracy.png"
GROUP_CAP = 200  # copies trained at once (bench_subspace.train_curve's groups)
KS = (25, 50, 100, 200, 400)
SCORES = ("covariance", "correlation", "subspace")
INFLUENCE_MAX_PARAMETERS = 8000
BASELINES = (
    ("gradient dot product", "gradient_dot", {}),
    ("influence, exact Hessian, δ=2·|λ_min|", "influence", {}),
    ("EK-FAC (kronfluence), default damping", "ekfac", {}),
)


# ---------------------------------------------------------------------------------------------
# Candidates: name -> benchmark -> DaunceConfig (num_models is set to the curve's largest K)
# ---------------------------------------------------------------------------------------------


def paper(bench: Benchmark) -> DaunceConfig:
    """The paper's form: `DaunceConfig.paper` (`DaunceConfig()` before that existed)."""
    return DaunceConfig.paper() if hasattr(DaunceConfig, "paper") else DaunceConfig()


def flow(bench: Benchmark, **changes) -> DaunceConfig:
    """The attribute flow's default for this benchmark's recipe (`flows.config.flow_daunce`),
    whatever it is at the code's commit."""
    config = from_dict(DaunceConfig, flow_daunce(None, to_dict(bench.recipe)), "daunce")
    return replace(config, **changes)


def inherit(bench: Benchmark, **train) -> DaunceConfig:
    """The flow's former default (until 53b6f23): sampled labels, r = 1, ρ = 0.1, 10 epochs of
    batch 64 with the base recipe's optimiser, lr, momentum and betas, covariance."""
    recipe = bench.recipe
    inherited = {
        "optimizer": recipe.optimizer,
        "lr": recipe.lr,
        "momentum": recipe.momentum,
        "betas": recipe.betas,
        "epochs": 10,
        "batch_size": 64,
    }
    return DaunceConfig(
        subset_ratio=1.0,
        objective=Objective(labels="sampled", rho=0.1),
        train=TrainConfig(**(train or inherited)),
        score="covariance",
    )


def _lever(config: DaunceConfig, epochs: float | None = None, rho: float | None = None):
    """``config`` with its copies' epochs or its perturbation scale ρ changed."""
    if epochs is not None:
        config = replace(config, train=replace(config.train, epochs=epochs))
    if rho is not None:
        config = replace(config, objective=replace(config.objective, rho=rho))
    return config


CANDIDATES: dict[str, Callable[[Benchmark], DaunceConfig]] = {
    "paper": paper,
    "flow": flow,
    "inherit": inherit,
    "sgd-fixed": lambda bench: inherit(
        bench, optimizer="sgd", lr=0.01, momentum=0.9, epochs=20, batch_size=128
    ),
    # One lever moved from the default at a time (run at K = 100 for the README).
    "flow-2ep": lambda bench: _lever(flow(bench), epochs=2),
    "flow-5ep": lambda bench: _lever(flow(bench), epochs=5),
    "flow-10ep": lambda bench: _lever(flow(bench), epochs=10),
    "flow-rho0.03": lambda bench: _lever(flow(bench), rho=0.03),
    "flow-rho1": lambda bench: _lever(flow(bench), rho=1.0),
}
"""Named DAUNCE configurations. Add one with a line; a candidate that raises is skipped."""


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def now() -> np.ndarray:
    """Wall-clock and CPU seconds, as one array."""
    return np.array([time.perf_counter(), time.process_time()])


def _error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def run_baselines(bench: Benchmark, quick: bool) -> list[dict]:
    """LDS and seconds of each baseline, one run each; errors reported, not fatal."""
    rows = []
    for label, method, options in BASELINES:
        if method == "influence" and (quick or bench.parameters > INFLUENCE_MAX_PARAMETERS):
            print(f"  {label}: skipped ({bench.parameters} parameters)", flush=True)
            continue
        started = now()
        try:
            scores = baseline_scores(
                method,
                bench.model,
                bench.task,
                bench.train,
                bench.queries,
                l2=bench.l2,
                options=options,
            )
            seconds = now() - started
            lds, stderr = bench.lds(scores)
        except Exception as exc:  # report and go on
            print(f"  ! {label}: {_error(exc)}", flush=True)
            rows.append({"label": label, "method": method, "error": traceback.format_exc()})
            continue
        rows.append(
            {
                "label": label,
                "method": method,
                "lds": lds,
                "stderr": stderr,
                "seconds": float(seconds[0]),
                "cpu_seconds": float(seconds[1]),
            }
        )
        print(f"  {label}: LDS {lds:.3f} ± {stderr:.3f} ({seconds[0]:.1f} s)", flush=True)
    return rows


def _point(bench, k, score, scores, seconds, **extra) -> dict:
    lds, stderr = bench.lds(scores)
    return {
        "K": k,
        "score": score,
        "lds": lds,
        "stderr": stderr,
        "seconds": float(seconds[0]),
        "cpu_seconds": float(seconds[1]),
        **extra,
    }


def moment_points(bench, copies, trained, k, spent) -> list[dict]:
    """Covariance and correlation of the first ``k`` copies (their loss evaluation timed)."""
    started = now()
    rows = copies.evaluate(list(range(k)), trained)
    evaluated = now() - started
    valid = int((~np.asarray(rows.diverged)).sum())
    points = []
    for kind in ("covariance", "correlation"):
        started = now()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diverged rows are left out with a warning
            stats = collect_statistics(rows.train, rows.query)
            scores = write_scores(rows.train, rows.query, stats, kind=kind)
        seconds = spent + evaluated + now() - started
        points.append(_point(bench, k, kind, scores, seconds, valid=valid))
    return points


def subspace_point(bench, copies, trained, k, spent) -> dict:
    """The subspace score of the first ``k`` copies (the reflected pass and scoring timed)."""
    started = now()
    parts = copies.measure_reflected(trained)
    valid = parts.finite_rows() & ~np.asarray(trained.diverged)
    a, b = parts.train.central()[valid], parts.query.central()[valid]
    scores = subspace_scores(a, b, parts.curvature[np.ix_(valid, valid)])
    seconds = spent + now() - started
    return _point(bench, k, "subspace", scores, seconds, valid=int(valid.sum()))


def run_candidate(bench: Benchmark, name: str, ks: tuple[int, ...]) -> dict:
    """Train candidate ``name``'s copies up to ``max(ks)`` and score them at every K."""
    from bench_subspace import prefix, train_curve

    entry: dict = {"benchmark": bench.name, "candidate": name, "ks": list(ks)}
    try:
        config = replace(CANDIDATES[name](bench), num_models=max(ks))
        entry["config"] = to_dict(config)
        started = now()
        copies = TorchModuleAccess(
            bench.model,
            bench.task,
            bench.train,
            bench.queries,
            config,
            base_l2=bench.l2,
            compute=ComputeConfig(group_size=GROUP_CAP, device="cpu"),
        )
        setup = now() - started
        entry["setup_seconds"] = float(setup[0])
        trained, train_seconds = train_curve(copies, ks)
        entry["lr"] = None if trained.lr is None else float(trained.lr)
    except Exception as exc:  # a candidate that cannot run is reported, not fatal
        print(f"  ! {name}: {_error(exc)}", flush=True)
        return {**entry, "error": traceback.format_exc()}
    entry["diverged"] = int(np.asarray(trained.diverged).sum())
    entry["points"], entry["errors"] = [], []
    for k in sorted(ks):
        first = prefix(trained, k)
        spent = setup + train_seconds[k]
        points = []
        for label, measure in (("moments", moment_points), ("subspace", subspace_point)):
            try:
                made = measure(bench, copies, first, k, spent)
            except Exception as exc:
                print(f"  ! {name} K={k} {label}: {_error(exc)}", flush=True)
                entry["errors"].append({"K": k, "score": label, "error": traceback.format_exc()})
                continue
            points += made if isinstance(made, list) else [made]
        entry["points"] += points
        shown = ", ".join(f"{p['score'][:3]} {p['lds']:.3f}" for p in points)
        print(f"  {name} K={k}: {shown} ({points[-1]['seconds']:.1f} s)", flush=True)
    return entry


# ---------------------------------------------------------------------------------------------
# Results: merging, tables, worst case
# ---------------------------------------------------------------------------------------------


def key(benchmark: str, candidate: str) -> str:
    return f"{benchmark}::{candidate}"


def merge(old: dict, benchmark_info: dict, runs: dict) -> dict:
    """``old`` results with this invocation's benchmark info and (benchmark, candidate) runs;
    entries of a benchmark whose ground truth (M, S) changed are dropped."""
    merged = {
        "benchmarks": dict(old.get("benchmarks", {})),
        "runs": dict(old.get("runs", {})),
    }
    for name, info in benchmark_info.items():
        before = merged["benchmarks"].get(name)
        truth = {k: info["ground_truth"][k] for k in ("M", "S")}
        if before and {k: before["ground_truth"][k] for k in ("M", "S")} != truth:
            print(f"note: {name}'s ground truth changed to {truth}; its old entries dropped")
            merged["runs"] = {k: v for k, v in merged["runs"].items() if v["benchmark"] != name}
            before = None
        if "baselines" not in info and before and "baselines" in before:
            info = {
                **info,
                "baselines": before["baselines"],
                "baselines_at": before.get("baselines_at"),
            }
        merged["benchmarks"][name] = info
    merged["runs"].update(runs)
    return merged


def best_baseline(info: dict) -> dict | None:
    rows = [b for b in info.get("baselines", []) if "lds" in b]
    return max(rows, key=lambda b: b["lds"]) if rows else None


def curve_rows(results: dict, benchmark: str) -> tuple[list[int], list[list]]:
    """Table rows of one benchmark: candidate × score, LDS (seconds) at each K."""
    runs = [r for r in results["runs"].values() if r["benchmark"] == benchmark]
    ks = sorted({p["K"] for r in runs for p in r.get("points", [])})
    rows = []
    for run in sorted(runs, key=lambda r: _order(r["candidate"])):
        if "error" in run:
            rows.append([run["candidate"], "error (below)"])
            continue
        for score in SCORES:
            by_k = {p["K"]: p for p in run["points"] if p["score"] == score}
            cells = [
                f"{by_k[k]['lds']:.3f} ({by_k[k]['seconds']:.0f}s)" if k in by_k else "-"
                for k in ks
            ]
            rows.append([f"{run['candidate']}, {score}", *cells])
    return ks, rows


def _order(candidate: str) -> tuple:
    names = list(CANDIDATES)
    return (names.index(candidate) if candidate in names else len(names), candidate)


def benchmark_table(results: dict, benchmark: str) -> str:
    info = results["benchmarks"][benchmark]
    ks, rows = curve_rows(results, benchmark)
    width = 1 + len(ks)
    rows = [row + [""] * (width - len(row)) for row in rows]
    for b in info.get("baselines", []):
        cell = "error" if "error" in b else f"{b['lds']:.3f} ({b['seconds']:.1f}s)"
        rows.append([f"baseline: {b['label']}", cell, *[""] * (width - 2)])
    table = format_table(["candidate, score", *(f"K={k}" for k in ks)], rows)
    errors = [
        f"{r['candidate']}: {r['error'].strip().splitlines()[-1]}"
        for r in results["runs"].values()
        if r["benchmark"] == benchmark and "error" in r
    ]
    return "\n".join([table, *errors])


def worst_case(results: dict, benchmarks: list[str] | None = None) -> list[dict]:
    """For each (candidate, score, K): the minimum over benchmarks of LDS / best baseline's LDS
    and of raw LDS, with the benchmarks that attain them and how many benchmarks it covers."""
    names = benchmarks or list(results["benchmarks"])
    cells: dict[tuple, list] = {}
    for run in results["runs"].values():
        if run["benchmark"] not in names or "error" in run:
            continue
        best = best_baseline(results["benchmarks"][run["benchmark"]])
        for p in run["points"]:
            ratio = p["lds"] / best["lds"] if best and best["lds"] > 0 else None
            cells.setdefault((run["candidate"], p["score"], p["K"]), []).append(
                (run["benchmark"], p["lds"], ratio)
            )
    rows = []
    for (candidate, score, k), values in cells.items():
        ratios = [v for v in values if v[2] is not None]
        low_ratio = min(ratios, key=lambda v: v[2]) if ratios else None
        low = min(values, key=lambda v: v[1])
        rows.append(
            {
                "candidate": candidate,
                "score": score,
                "K": k,
                "benchmarks": len(values),
                "of": len(names),
                "min_ratio": low_ratio and low_ratio[2],
                "min_ratio_at": low_ratio and low_ratio[0],
                "min_lds": low[1],
                "min_lds_at": low[0],
                "mean_ratio": float(np.mean([v[2] for v in ratios])) if ratios else None,
            }
        )
    return sorted(rows, key=lambda r: (_order(r["candidate"]), SCORES.index(r["score"]), r["K"]))


def worst_table(rows: list[dict]) -> str:
    cells = [
        [
            f"{r['candidate']}, {r['score']}",
            r["K"],
            f"{r['benchmarks']}/{r['of']}",
            "-" if r["min_ratio"] is None else f"{r['min_ratio']:.3f} ({r['min_ratio_at']})",
            f"{r['min_lds']:.3f} ({r['min_lds_at']})",
            "-" if r["mean_ratio"] is None else f"{r['mean_ratio']:.3f}",
        ]
        for r in rows
    ]
    headers = [
        "candidate, score",
        "K",
        "benchmarks",
        "min LDS / best baseline (where)",
        "min LDS (where)",
        "mean ratio",
    ]
    return format_table(headers, cells)


def summary_table(results: dict) -> str:
    rows = []
    for name, info in results["benchmarks"].items():
        q = info["query_quality"]
        quality = (
            f"acc {q['accuracy']:.3f}"
            if "accuracy" in q
            else f"MSE {q['mse']:.3f} R² {q['r2']:.2f}"
        )
        truth, agree = info["ground_truth"], info.get("agreement") or {}
        best = best_baseline(info)
        rows.append(
            [
                name,
                info["parameters"],
                info["n_train"],
                info["m_query"],
                quality,
                f"{truth['M']}×{truth['S']}",
                f"{agree['seed_agreement_loss']:.3f}" if agree.get("seed_agreement_loss") else "-",
                f"{best['lds']:.3f} ({best['label'].split(',')[0]})" if best else "-",
            ]
        )
    headers = ["benchmark", "params", "n", "m", "query", "M×S", "seed agr.", "best baseline"]
    return format_table(headers, rows)


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> Path:
    """One panel per benchmark: LDS against seconds (log x), candidate × score lines over K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["benchmarks"])
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    candidates = sorted({r["candidate"] for r in results["runs"].values()}, key=_order)
    color = {c: colors[i % len(colors)] for i, c in enumerate(candidates)}
    styles = {"covariance": "-", "correlation": "--", "subspace": ":"}
    marks = {"covariance": "o", "correlation": "s", "subspace": "^"}
    shapes = {"gradient_dot": "x", "influence": "*", "ekfac": "D"}
    for ax, name in zip(axes.flat, names, strict=False):
        info = results["benchmarks"][name]
        for run in results["runs"].values():
            if run["benchmark"] != name or "error" in run:
                continue
            for score in SCORES:
                pts = sorted(
                    (p for p in run["points"] if p["score"] == score), key=lambda p: p["K"]
                )
                if not pts:
                    continue
                xs, ys = [p["seconds"] for p in pts], [p["lds"] for p in pts]
                ax.plot(
                    xs,
                    ys,
                    linestyle=styles[score],
                    marker=marks[score],
                    markersize=3,
                    color=color[run["candidate"]],
                    label=f"{run['candidate']}, {score}",
                )
                ax.annotate(
                    f"{pts[-1]['K']}",
                    (xs[-1], ys[-1]),
                    fontsize=6,
                    color=color[run["candidate"]],
                    xytext=(2, 2),
                    textcoords="offset points",
                )
        for b in info.get("baselines", []):
            if "lds" in b:
                ax.plot(
                    b["seconds"],
                    b["lds"],
                    marker=shapes.get(b["method"], "P"),
                    linestyle="none",
                    color="black",
                    markersize=8,
                    markerfacecolor="none" if b["method"] != "gradient_dot" else "black",
                    label=b["label"],
                )
        agree = (info.get("agreement") or {}).get("seed_agreement_loss")
        ax.set_title(
            f"{name} ({info['parameters']} params, n={info['n_train']}"
            + (f", seed agreement {agree:.2f})" if agree else ")"),
            fontsize=10,
        )
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock seconds (1 thread; K annotated at each curve's end)")
        ax.set_ylabel("LDS (negated loss, Spearman)")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)

    def rank(label: str) -> tuple:
        if label.startswith(tuple(b[0] for b in BASELINES)):
            return (1, (0, ""), 0)
        candidate, score = label.rsplit(", ", 1)
        return (0, _order(candidate), SCORES.index(score))

    ordered = sorted(legend, key=rank)
    columns = 4
    fig.legend(
        [legend[label] for label in ordered],
        ordered,
        loc="lower center",
        ncol=columns,
        fontsize=8,
    )
    space = (0.25 + 0.17 * -(-len(ordered) // columns)) / (5.2 * rows)
    fig.tight_layout(rect=(0, space, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DAUNCE_COMMIT")
    return out.stdout.strip()


def report(results: dict) -> None:
    print("\nbenchmarks")
    print(summary_table(results))
    for name in results["benchmarks"]:
        print(f"\n{name}: LDS (cumulative seconds) against K; baselines at the bottom")
        print(benchmark_table(results, name))
    print("\nworst case over benchmarks (ratio: LDS / that benchmark's best baseline LDS)")
    print(worst_table(results["worst_case"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--benchmarks", default=None, help=f"comma-separated: {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--candidates", default=None, help=f"comma-separated: {','.join(CANDIDATES)}"
    )
    parser.add_argument("--ks", default=None, help="comma-separated K curve (25,50,100,200,400)")
    parser.add_argument("--subsets", type=int, default=40, help="ground truth: M subsets")
    parser.add_argument("--seeds", type=int, default=1, help="ground truth: S seeds a subset")
    parser.add_argument("--rerun-baselines", action="store_true", help="even where stored")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under results/cache")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    folder = CACHE if args.quick else RESULTS
    json_path = folder / (f"{NAME}_quick.json" if args.quick else f"{NAME}.json")
    png_path = folder / (PLOT.replace(".png", "_quick.png") if args.quick else PLOT)
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    if args.plot_only:
        print(plot(old, png_path))
        return
    default_benchmarks = "digits-logreg,diabetes-mlp" if args.quick else ",".join(BENCHMARKS)
    names = (args.benchmarks or default_benchmarks).split(",")
    candidates = (args.candidates or ",".join(CANDIDATES)).split(",")
    unknown = [n for n in names if n not in BENCHMARKS] + [
        c for c in candidates if c not in CANDIDATES
    ]
    if unknown:
        parser.error(f"unknown benchmark or candidate: {', '.join(unknown)}")
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else (10, 20) if args.quick else KS
    started = time.perf_counter()
    info = machine_info()
    print(machine_line(info), flush=True)
    stamp = {"timestamp": info["timestamp"], "commit": _commit()}
    benchmark_info, runs = {}, {}
    for name in names:
        bench = load(name, args.subsets, args.seeds)
        bench.info["agreement"] = agreement(bench, compute=False)
        stored = old.get("benchmarks", {}).get(name, {})
        same_truth = (
            stored.get("ground_truth", {}).get("M") == args.subsets
            and stored.get("ground_truth", {}).get("S") == args.seeds
        )
        print(
            f"\n{name}: {bench.parameters} parameters, n={bench.n_train}, m={bench.m_query}, "
            f"query {bench.info['query_quality']}",
            flush=True,
        )
        if args.rerun_baselines or not (same_truth and "baselines" in stored):
            bench.info["baselines"] = run_baselines(bench, args.quick)
            bench.info["baselines_at"] = stamp
        benchmark_info[name] = bench.info
        for candidate in candidates:
            load_before = os.getloadavg()[0]
            entry = run_candidate(bench, candidate, ks)
            entry.update(stamp, load_before=load_before, load_after=os.getloadavg()[0])
            runs[key(name, candidate)] = entry
    results = merge(old, benchmark_info, runs)
    results["worst_case"] = worst_case(results)
    output = {
        "machine": info,
        "command": " ".join([".venv/bin/python", "bench/bench_defaults.py", *sys.argv[1:]]),
        "notes": __doc__,
        **results,
    }
    output = json.loads(json.dumps(output, default=_json_default))
    report(output)
    if args.quick:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(output, indent=2) + "\n")
    else:
        json_path = write_results(NAME, output)
    plot(output, png_path)
    print(f"\nwrote {json_path} and {png_path}; {time.perf_counter() - started:.0f} s")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()

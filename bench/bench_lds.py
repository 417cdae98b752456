"""The accuracy benchmark: LDS, wall-clock and peak memory of every DAUNCE variant and baseline.

Data: sklearn digits, the embedded split (`daunce_core.evaluation.datasets.digits`: 1597 training
examples, 200 queries; all 200 queries are scored). Two models, each with one fixed recipe used
for the base model, for TracIn's checkpoints, for TRAK's ensemble members and for the ground
truth (SGD momentum 0.9, cosine schedule, batch 64, L2 λ = 1e-3):

* ``mlp`` — 64 → 64 → 10, ReLU (4810 parameters); lr 0.1, 30 epochs (the earlier bench's).
* ``logreg`` — softmax regression, ``nn.Linear(64, 10)`` (650 parameters); lr 0.5, 50 epochs.
  Convex; this recipe ends 4e-5 above the optimum of the training objective (1% from the
  L-BFGS optimum in parameter distance), and ground-truth retrainings from different seeds agree
  to 0.993 (``seed_agreement_loss`` in the JSON).

Ground truth (`daunce_core.evaluation.lds`): M = 100 random half-subsets × S = 3 seeds, each
retrained from
scratch with the recipe (all at once, vectorised), run as `retrain_on_subsets` does (same jobs,
initialisations and visiting orders) but keeping two outcomes of the same models: the negated
query loss (the main LDS) and the query margin (``LDS (margin)``). Cached in
``bench/results/cache/`` (git-ignored), keyed by everything that determines it.

Methods. The base model's own training is excluded from every method's cost; everything a
method needs beyond it is counted:

* baselines (`daunce_core.baselines.methods`): gradient dot product; the exact influence function
  ``(H + λ + δ)⁻¹`` at δ = 0, 1e-3, 1e-2 and the pipeline's default δ = 2·|λ_min|, λ_min the
  Hessian's most negative eigenvalue (the MLP's Hessian is indefinite, so δ matters; the best
  fixed δ is picked with the ground truth, an optimistic baseline); our TRAK with one model
  (projection 512); TracIn over 5 checkpoints saved during the base model's training (the
  checkpoints come with that excluded training; only the scoring is timed); EK-FAC via
  kronfluence (its default damping heuristic, and δ = 0); TRAK via traker with 1 and with 5
  models (the 4 extra models' training is counted).
* DAUNCE (`daunce_core.access.torch_module.access.TorchModuleAccess`, the steps of
  `daunce_core.method.attribute`): the paper
  form (`DaunceConfig()` defaults: hessian, observed labels, r = 0.3, γ = ρ = 1, SGD lr 0.01, 1
  epoch), and DESIGN §1's forms — sampled labels, r = 1, ρ = 0.1, proximal λ = the base L2,
  copies trained for 10 epochs at the recipe's learning rate. The full grid variant
  (hessian/efim/trak) × labels (observed/sampled) × r (0.3/1) × score (covariance/correlation)
  at K = 200; curves over K for the main variants; and one-at-a-time levers around the
  sampled-label default at K = 200: ρ, training length, learning rate, float64, antithetic
  pairs, γ = 0.01 (the authors' code), and the group size (speed only).

K curve: copies are i.i.d. given (seed, k), so one run trains K_max copies, in groups ending at
every K of the curve (groups of at most 200 copies, vectorised), and scores the first K rows as
soon as they exist. The seconds at K = set-up (base signals) + the measured training and loss
evaluation of the first K copies + the scoring at K (covariance and correlation timed apart).
Peak memory at K is the process's high-water mark up to that scoring.

Timing and memory: every method runs in its own fresh process, forked from a fork server that
has imported torch, daunce_core and the peer packages but run nothing (forking the main process
after torch has run deadlocks its thread pool), given the trained model, data and ground truth.
In that process the resident-set high-water mark is reset (``/proc/self/clear_refs``) just
before the method starts, and ``peak MB`` is ``VmHWM − VmRSS`` then: the memory the method
needed on top of an idle process that holds the data and model (imports excluded). Seconds are
wall-clock: for cheap methods (first run under 5 s) the median of 3 runs, otherwise (exact
influence on the MLP, TRAK ensembles, every DAUNCE run) one measured run. CPU seconds (user +
system of the process) and the load average around each run are in the JSON: this 2-core machine
is shared, other jobs inflate wall-clock times (by up to several times) — compare times within
one run only.

Usage: ``.venv/bin/python bench/bench_lds.py [--quick] [--models mlp,logreg]``; writes
``bench/results/lds.json`` and the plots ``bench/results/lds_vs_k.png`` and
``lds_vs_seconds.png`` (`bench/plots.py`). ``--quick`` is a ~1-minute smoke run (M = 20,
S = 1, small K, a few methods) that writes ``lds_quick.json`` and its plots under
``bench/results/cache/`` only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import multiprocessing
import os
import resource
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

os.environ.setdefault("TQDM_DISABLE", "1")  # traker's progress bars

import numpy as np
import torch
from common import RESULTS, format_table, machine_info, machine_line, write_results
from torch import nn

from daunce_core import ClassificationTask, DaunceConfig, Objective, TrainConfig
from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.access.torch_module.evaluation import evaluate_copies
from daunce_core.access.torch_module.stacked import stack_copies, trainable_names
from daunce_core.access.torch_module.training import train_copies
from daunce_core.baselines.methods import baseline_scores, fit_checkpoints, tracin
from daunce_core.conversion import from_dict, to_dict
from daunce_core.evaluation.datasets import digits
from daunce_core.evaluation.lds import lds_jobs, lds_subsets, linear_datamodeling_score
from daunce_core.method.draws import PerturbationDraw
from daunce_core.method.scores import collect_statistics, write_scores
from flows.config import flow_daunce

CACHE = RESULTS / "cache"
L2 = 1e-3
TASK = ClassificationTask()
CHEAP_SECONDS = 5.0
GROUP_CAP = 200
KINDS = ("covariance", "correlation")


def mlp(seed: int) -> nn.Module:
    """The MLP 64 → 64 → 10 (ReLU), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def logreg(seed: int) -> nn.Module:
    """Softmax regression 64 → 10, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its constructor and its one training recipe."""

    name: str
    make_model: Callable[[int], nn.Module]
    recipe: TrainConfig
    l2: float = L2


MODELS = {
    "mlp": ModelSpec("mlp", mlp, TrainConfig(lr=0.1, epochs=30, batch_size=64)),
    "logreg": ModelSpec("logreg", logreg, TrainConfig(lr=0.5, epochs=50, batch_size=64)),
}


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def _digest(*arrays: torch.Tensor | np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


def retrain_outcomes(spec: ModelSpec, train, queries, subsets, seeds, group_size=100):
    """`retrain_on_subsets`'s M × S models, two outcomes each: ``[M, S, m]`` −loss and margin."""
    jobs = lds_jobs(subsets, seeds)
    n = len(train["y"])
    loss, margin = [], []
    for start in range(0, len(jobs), group_size):
        group = jobs[start : start + group_size]
        model = spec.make_model(0).eval()
        names = trainable_names(model, TASK)
        inits = {s: stack_copies(spec.make_model(s), names, 1) for s in {j.seed for j in group}}
        init = {name: torch.cat([inits[j.seed][name] for j in group]) for name in names}
        draws = [
            PerturbationDraw(
                k=j.order, subset=np.flatnonzero(j.keep), xi=np.full(n, 0.5), source=j.order
            )
            for j in group
        ]
        trained = train_copies(
            model,
            TASK,
            train,
            draws,
            lambda out, batch, side: TASK.loss_from_outputs(out, batch),
            spec.recipe,
            names=names,
            l2=spec.l2,
            init=init,
        )
        if trained.diverged.any():
            raise RuntimeError("a ground-truth retraining diverged")
        for out, kind in ((loss, "loss"), (margin, "margin")):
            values = evaluate_copies(model, TASK, trained.params, queries, measurement=kind)
            out.append(values.double().numpy())
    shape = (len(subsets), seeds, -1)
    # evaluate_copies gives the loss and the negated margin (lower is better): flip both.
    return -np.concatenate(loss).reshape(shape), -np.concatenate(margin).reshape(shape)


def ground_truth(spec: ModelSpec, train, queries, count: int, seeds: int) -> dict:
    """Subsets and both outcomes, from the cache when the same settings were run before."""
    key = {
        "model": spec.name,
        "architecture": str(spec.make_model(0)),
        "recipe": to_dict(spec.recipe),
        "l2": spec.l2,
        "M": count,
        "S": seeds,
        "alpha": 0.5,
        "subset_seed": 0,
        "data": _digest(train["x"], train["y"], queries["x"], queries["y"]),
        "torch": torch.__version__,
        "version": 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"lds_truth_{spec.name}_{digest}.npz"
    subsets = lds_subsets(len(train["y"]), count, seed=0)
    if path.exists():
        with np.load(path) as cached:
            return {
                "subsets": subsets,
                "loss": cached["loss"],
                "margin": cached["margin"],
                "seconds": float(cached["seconds"]),
                "cached": True,
            }
    started = time.perf_counter()
    loss, margin = retrain_outcomes(spec, train, queries, subsets, seeds)
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, loss=loss, margin=margin, seconds=seconds, key=json.dumps(key))
    tmp.replace(path)
    return {"subsets": subsets, "loss": loss, "margin": margin, "seconds": seconds, "cached": False}


def seed_agreement(outcomes: np.ndarray) -> float | None:
    """Mean Spearman, over queries and seed pairs, between two seeds' outcomes (noise ceiling)."""
    from daunce_core.evaluation.metrics import spearman_columns

    seeds = outcomes.shape[1]
    if seeds < 2:
        return None
    pairs = [(a, b) for a in range(seeds) for b in range(a + 1, seeds)]
    return float(
        np.mean([np.nanmean(spearman_columns(outcomes[:, a], outcomes[:, b])) for a, b in pairs])
    )


# ---------------------------------------------------------------------------------------------
# Measuring one method in its own process
# ---------------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class PeakMemory:
    """Peak resident memory above this process's resident memory at construction, in MB."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current VmRSS
            self.source = "VmHWM"
        except OSError:
            self.source = "ru_maxrss"
        self.base_kb = _status_kb("VmRSS")

    def mb(self) -> float:
        if self.source == "VmHWM":
            peak = _status_kb("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0.0, (peak - self.base_kb) / 1024)


class Clock:
    """Wall-clock and CPU seconds since construction (or the last `lap`)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return result


@dataclass
class Bench:
    """What every method gets: the trained model, the data, the ground truth."""

    spec: ModelSpec
    model: nn.Module
    train: dict
    queries: dict
    subsets: np.ndarray
    outcomes: dict  # "loss" / "margin" -> [M, S, m]
    checkpoints: list  # TracIn: (state_dict, lr) saved while training the base model

    def lds(self, scores: np.ndarray, outcome: str = "loss") -> tuple[float, float]:
        result = linear_datamodeling_score(scores, self.subsets, self.outcomes[outcome])
        return float(result.mean), float(result.stderr)


def _child(conn, bench: Bench, job) -> None:
    warnings.filterwarnings("ignore")
    try:
        conn.send(("ok", job.run(bench)))
    except Exception:  # report, and let the benchmark go on
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


_CONTEXT = None


def _context():
    """A fork server that has imported this module and the peers, nothing run: forks are fresh."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(
            ["__main__", "kronfluence", "trak", "daunce_core.baselines.peers"]
        )
    return _CONTEXT


def isolated(bench: Bench, job) -> dict:
    """Run ``job.run(bench)`` in a fresh process (forked from the fork server); its result."""
    context = _context()
    receive, send = context.Pipe(duplex=False)
    load = os.getloadavg()[0]
    process = context.Process(target=_child, args=(send, bench, job))
    process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        status, payload = "error", f"the worker died (exit code {process.exitcode})"
    process.join()
    if status != "ok":
        print(f"  ! {job.label}: {payload.strip().splitlines()[-1]}", flush=True)
        return {"label": job.label, "error": payload}
    payload["load_before"], payload["load_after"] = load, os.getloadavg()[0]
    return payload


@dataclass
class BaselineJob:
    """One baseline method with its options; ``margin``: also its margin-measurement LDS."""

    label: str
    method: str
    options: dict = field(default_factory=dict)
    margin: bool = False

    def scores(self, bench: Bench, measurement: str = "loss") -> np.ndarray:
        options = dict(self.options)
        if self.method in ("gradient_dot", "influence", "ekfac", "tracin"):
            options["measurement"] = measurement
        if self.method == "tracin":
            models = [_with_state(bench.model, state) for state, _ in bench.checkpoints]
            rates = [lr for _, lr in bench.checkpoints]
            return tracin(models, rates, TASK, bench.train, bench.queries, measurement)
        return baseline_scores(
            self.method,
            bench.model,
            TASK,
            bench.train,
            bench.queries,
            l2=bench.spec.l2,
            make_model=bench.spec.make_model,
            train_config=bench.spec.recipe,
            options=options,
        )

    def run(self, bench: Bench) -> dict:
        peak = PeakMemory()
        walls, cpus = [], []
        while True:
            clock = Clock()
            scores = self.scores(bench)
            wall, cpu = clock.lap()
            walls.append(wall)
            cpus.append(cpu)
            if walls[0] >= CHEAP_SECONDS or len(walls) == 3:
                break
        memory = peak.mb()
        lds, stderr = bench.lds(scores)
        result = {
            "label": self.label,
            "family": "baseline",
            "method": self.method,
            "options": self.options,
            "lds": lds,
            "stderr": stderr,
            "seconds": statistics.median(walls),
            "cpu_seconds": statistics.median(cpus),
            "timed_runs": len(walls),
            "peak_mb": memory,
            "memory_source": peak.source,
        }
        if self.margin:
            native = self.method in ("trak", "trak_ensemble")  # margin gradients already
            margin_scores = scores if native else self.scores(bench, "margin")
            result["lds_margin"], result["stderr_margin"] = bench.lds(margin_scores, "margin")
        return result


def _with_state(model: nn.Module, state: dict) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()


@dataclass
class DaunceJob:
    """DAUNCE with one configuration, scored at every K of ``ks`` (a curve) or at one K.

    ``group_cap``: the most copies trained at once (vectorised). ``margin``: also measure the
    queries' margins with the same copies (untimed) for the margin LDS (covariance).
    """

    label: str
    config: DaunceConfig
    ks: tuple[int, ...]
    group_cap: int = GROUP_CAP
    margin: bool = False
    headline: bool = False

    def run(self, bench: Bench) -> dict:
        config = replace(self.config, num_models=max(self.ks))
        peak = PeakMemory()
        clock = Clock()
        copies = TorchModuleAccess(
            bench.model, TASK, bench.train, bench.queries, config, base_l2=bench.spec.l2
        )
        wall, cpu = clock.lap()
        margins = None
        if self.margin:
            margins = TorchModuleAccess(
                bench.model,
                TASK,
                bench.train,
                bench.queries,
                replace(config, measurement="margin"),
                base_l2=bench.spec.l2,
                signals=copies.signals,
            )
        train_rows, query_rows, margin_rows, diverged = [], [], [], 0
        points, done = [], 0
        for k_target in sorted(self.ks):
            while done < k_target:
                ks = list(range(done, min(k_target, done + self.group_cap)))
                clock.lap()
                trained = copies.train(ks)
                rows = copies.evaluate(ks, trained)
                step_wall, step_cpu = clock.lap()
                wall, cpu = wall + step_wall, cpu + step_cpu
                train_rows.append(rows.train)
                query_rows.append(rows.query)
                diverged += int(rows.diverged.sum())
                if margins is not None:
                    values = margins.measure_queries(trained, 0)
                    values[rows.diverged] = np.nan
                    margin_rows.append(values)
                done = ks[-1] + 1
            a, b = np.concatenate(train_rows), np.concatenate(query_rows)
            for kind in KINDS:
                clock.lap()
                stats = collect_statistics(a, b)
                scores = write_scores(a, b, stats, kind=kind)
                score_wall, score_cpu = clock.lap()
                memory = peak.mb()
                lds, stderr = bench.lds(scores)
                point = {
                    "K": k_target,
                    "score": kind,
                    "lds": lds,
                    "stderr": stderr,
                    "seconds": wall + score_wall,
                    "cpu_seconds": cpu + score_cpu,
                    "train_seconds": wall,
                    "score_seconds": score_wall,
                    "peak_mb": memory,
                    "diverged": diverged,
                }
                if margins is not None and kind == "covariance":
                    bm = np.concatenate(margin_rows)
                    margin_scores = write_scores(
                        a, bm, collect_statistics(a, bm), kind="covariance"
                    )
                    point["lds_margin"], point["stderr_margin"] = bench.lds(margin_scores, "margin")
                points.append(point)
        return {
            "label": self.label,
            "family": "daunce",
            "headline": self.headline,
            "config": to_dict(replace(config, num_models=max(self.ks))),
            "group_cap": self.group_cap,
            "memory_source": peak.source,
            "points": points,
        }


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def baseline_jobs(spec: ModelSpec, quick: bool) -> list[BaselineJob]:
    best_damping = 1e-2 if spec.name == "mlp" else 0.0  # best loss LDS in exploration
    jobs = [BaselineJob("gradient dot product", "gradient_dot", margin=True)]
    dampings = (best_damping,) if quick else (0.0, 1e-3, 1e-2, None)
    if not (quick and spec.name == "mlp"):  # exact Hessian of the MLP: ~15 s, skip in smoke
        jobs += [
            BaselineJob(
                "influence, exact Hessian, "
                + (f"δ={d:g}" if d is not None else "δ=2·|λ_min| (default)"),
                "influence",
                {"damping": d},
                margin=d == best_damping,
            )
            for d in dampings
        ]
    jobs += [
        BaselineJob("TRAK (ours), 1 model, proj 512", "trak", margin=True),
        BaselineJob("TracIn, 5 checkpoints", "tracin", margin=True),
        BaselineJob("EK-FAC (kronfluence), default damping", "ekfac", margin=True),
    ]
    if quick:
        return [*jobs, BaselineJob("TRAK (traker), 2 models", "trak_ensemble", {"models": 2})]
    return [
        *jobs,
        BaselineJob("EK-FAC (kronfluence), δ=0", "ekfac", {"damping": 0.0}),
        BaselineJob("TRAK (traker), 1 model", "trak_ensemble", {"models": 1}, margin=True),
        BaselineJob("TRAK (traker), 5 models", "trak_ensemble", {"models": 5}, margin=True),
    ]


def describe(config: DaunceConfig, group_cap: int = GROUP_CAP) -> str:
    """A short label of a DAUNCE configuration."""
    if replace(config, num_models=2, score="correlation") == DaunceConfig(num_models=2):
        return "DAUNCE paper form (hessian/observed r=0.3 ρ=1 1 ep lr=0.01)"
    o, t = config.objective, config.train
    length = f"{t.steps} steps" if t.steps else f"{t.epochs:g} ep"
    parts = [
        f"{o.variant}/{o.labels}",
        f"r={config.subset_ratio:g}",
        f"ρ={o.rho:g}",
        f"{length} lr={t.lr:g}",
    ]
    if o.gamma != 1:
        parts.append(f"γ={o.gamma:g}")
    if t.batch_size != 64:
        parts.append(f"batch {t.batch_size}")
    if config.prox is not None:
        parts.append(f"prox={config.prox:g}")
    if config.dtype != "float32":
        parts.append(config.dtype)
    if config.antithetic:
        parts.append("antithetic")
    if group_cap != GROUP_CAP:
        parts.append(f"groups of {group_cap}")
    return "DAUNCE " + " ".join(parts)


def default_config(spec: ModelSpec, **changes) -> DaunceConfig:
    """The attribute flow's default (`flows.config.flow_daunce` with this model's recipe):
    sampled labels, r = 1, ρ = 0.1, 10 epochs at the recipe's optimiser and lr, covariance."""
    config = from_dict(DaunceConfig, flow_daunce(None, to_dict(spec.recipe)), "daunce")
    return replace(config, **changes)


def daunce_jobs(spec: ModelSpec, quick: bool) -> list[DaunceJob]:
    head = default_config(spec)
    if quick:
        curve, big, at = (10, 20), (10, 20, 40), 20
    else:
        curve, at = (25, 50, 100, 200, 400, 800), 200
        big = (*curve, 1600, 3200)
    objective = head.objective
    paper = DaunceConfig()
    curves = [
        (paper, curve, False),
        (head, big, True),
        (replace(head, subset_ratio=0.3), big, False),
        (replace(head, objective=replace(objective, labels="observed")), curve, False),
        (replace(head, objective=replace(objective, variant="efim")), curve, False),
        (replace(head, objective=replace(objective, variant="trak")), curve, False),
        (replace(head, train=replace(head.train, epochs=3)), curve, False),
    ]
    if quick:
        curves = curves[:2]
    jobs = [DaunceJob(describe(c), c, ks, margin=m, headline=m) for c, ks, m in curves]
    seen = {_key(c) for c, _, _ in curves}
    singles = []
    for variant in ("hessian", "efim", "trak"):
        for labels in ("observed", "sampled"):
            for ratio in (0.3, 1.0):
                singles.append(
                    replace(
                        head,
                        subset_ratio=ratio,
                        objective=replace(objective, variant=variant, labels=labels),
                    )
                )
    singles += [
        replace(head, objective=replace(objective, rho=1.0)),
        replace(head, objective=replace(objective, rho=0.01)),
        replace(head, train=replace(head.train, epochs=1)),
        replace(head, train=replace(head.train, epochs=20)),
        replace(head, train=replace(head.train, lr=2 * spec.recipe.lr)),
        replace(head, train=replace(head.train, lr=0.5 * spec.recipe.lr)),
        replace(head, train=replace(head.train, batch_size=128)),
        replace(head, prox=0.0),
        replace(head, prox=1e-2),
        replace(head, dtype="float64"),
        replace(head, antithetic=True),
        replace(paper, objective=Objective(gamma=0.01)),
    ]
    if quick:
        singles = singles[:1]
    for config in singles:
        if _key(config) not in seen:
            seen.add(_key(config))
            jobs.append(DaunceJob(describe(config), config, (at,)))
    if not quick:
        jobs.append(DaunceJob(describe(head, 25), head, (at,), group_cap=25))
    return jobs


def _key(config: DaunceConfig) -> DaunceConfig:
    return replace(config, num_models=2, score="covariance")


# ---------------------------------------------------------------------------------------------
# Running, tables
# ---------------------------------------------------------------------------------------------


def prepare(spec: ModelSpec, count: int, seeds: int) -> tuple[Bench, dict]:
    train, queries = digits()
    model = spec.make_model(0)
    clock = Clock()
    checkpoints = fit_checkpoints(model, TASK, train, spec.recipe, l2=spec.l2, seed=0, count=5)
    base_seconds, _ = clock.lap()
    with torch.no_grad():
        accuracy = float((model(queries["x"]).argmax(1) == queries["y"]).float().mean())
    truth = ground_truth(spec, train, queries, count, seeds)
    bench = Bench(
        spec=spec,
        model=model,
        train=train,
        queries=queries,
        subsets=truth["subsets"],
        outcomes={"loss": truth["loss"], "margin": truth["margin"]},
        checkpoints=checkpoints,
    )
    info = {
        "recipe": to_dict(spec.recipe),
        "l2": spec.l2,
        "architecture": str(spec.make_model(0)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_train": len(train["y"]),
        "m_query": len(queries["y"]),
        "query_accuracy": accuracy,
        "base_training_seconds": base_seconds,
        "ground_truth": {
            "M": count,
            "S": seeds,
            "seconds": truth["seconds"],
            "cached": truth["cached"],
            "seed_agreement_loss": seed_agreement(truth["loss"]),
            "seed_agreement_margin": seed_agreement(truth["margin"]),
        },
    }
    return bench, info


def rows_of(result: dict) -> list[dict]:
    """Flat table rows of one job's result: one per (K, score) for DAUNCE."""
    if "error" in result:
        return []
    if result["family"] == "baseline":
        return [{**result, "K": None, "score": None}]
    return [
        {"label": result["label"], "family": "daunce", "config": result["config"], **point}
        for point in result["points"]
    ]


def _fmt(value, digits=3, width=None) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def method_table(results: list[dict], at: int) -> str:
    rows = []
    for result in results:
        for row in rows_of(result):
            if row["family"] == "daunce" and row["K"] != at:
                continue
            label = row["label"] + (f", {row['score'][:3]}" if row["score"] else "")
            rows.append(
                [
                    label,
                    row["K"] or "-",
                    _fmt(row["lds"]),
                    _fmt(row["stderr"]),
                    _fmt(row.get("lds_margin")),
                    _fmt(row["seconds"], 2),
                    _fmt(row["cpu_seconds"], 2),
                    _fmt(row["peak_mb"], 0),
                ]
            )
    headers = ["method", "K", "LDS", "± s.e.", "LDS margin", "seconds", "CPU s", "peak MB"]
    return format_table(headers, rows)


def curve_table(results: list[dict]) -> str:
    curves = [r for r in results if r.get("family") == "daunce" and len(r["points"]) > 2]
    ks = sorted({p["K"] for r in curves for p in r["points"]})
    rows = []
    for result in curves:
        for kind in KINDS:
            by_k = {p["K"]: p for p in result["points"] if p["score"] == kind}
            cells = [
                f"{by_k[k]['lds']:.3f} ({by_k[k]['seconds']:.1f}s)" if k in by_k else "-"
                for k in ks
            ]
            rows.append([f"{result['label']}, {kind[:3]}", *cells])
    return format_table(["variant, score", *[f"K={k}" for k in ks]], rows)


def versus(results: list[dict]) -> list[dict]:
    """The headline DAUNCE curve (covariance) against each baseline: LDS within its time, and
    the K and seconds DAUNCE needs to reach its LDS (None: not reached by the largest K)."""
    head = next((r for r in results if r.get("headline")), None)
    if head is None:
        return []
    points = sorted((p for p in head["points"] if p["score"] == "covariance"), key=lambda p: p["K"])
    rows = []
    baselines = [r for r in results if r.get("family") == "baseline"]
    for base in sorted(baselines, key=lambda r: -r["lds"]):
        within = [p for p in points if p["seconds"] <= base["seconds"]]
        best = max(within, key=lambda p: p["lds"]) if within else None
        reach = next((p for p in points if p["lds"] >= base["lds"]), None)
        rows.append(
            {
                "baseline": base["label"],
                "lds": base["lds"],
                "seconds": base["seconds"],
                "daunce_lds_within": best and best["lds"],
                "daunce_K_within": best and best["K"],
                "daunce_K_to_match": reach and reach["K"],
                "daunce_seconds_to_match": reach and reach["seconds"],
            }
        )
    return rows


def versus_table(rows: list[dict], largest: int) -> str:
    cells = [
        [
            r["baseline"],
            f"{r['lds']:.3f}",
            f"{r['seconds']:.2f}",
            "-"
            if r["daunce_lds_within"] is None
            else f"{r['daunce_lds_within']:.3f} (K={r['daunce_K_within']})",
            f"K={r['daunce_K_to_match']}, {r['daunce_seconds_to_match']:.1f}s"
            if r["daunce_K_to_match"]
            else f"not by K={largest}",
        ]
        for r in rows
    ]
    headers = ["baseline", "LDS", "seconds", "DAUNCE LDS in that time", "DAUNCE to match it"]
    return format_table(headers, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--models", default="mlp,logreg", help="comma-separated: mlp,logreg")
    args = parser.parse_args()
    count, seeds = (20, 1) if args.quick else (100, 3)
    at = 20 if args.quick else 200
    started = time.perf_counter()
    info = machine_info()
    print(machine_line(info), flush=True)
    output = {
        "machine": info,
        "quick": args.quick,
        "K_grid": at,
        "notes": __doc__,
        "models": {},
    }
    for name in args.models.split(","):
        spec = MODELS[name]
        bench, model_info = prepare(spec, count, seeds)
        truth = model_info["ground_truth"]
        print(
            f"\n{name}: {model_info['parameters']} parameters, query accuracy "
            f"{model_info['query_accuracy']:.3f}; ground truth M={count} × S={seeds} "
            f"({truth['seconds']:.0f} s{', cached' if truth['cached'] else ''}; seed agreement "
            f"{_fmt(truth['seed_agreement_loss'])})",
            flush=True,
        )
        results = []
        for job in baseline_jobs(spec, args.quick) + daunce_jobs(spec, args.quick):
            result = isolated(bench, job)
            results.append(result)
            shown = [r for r in rows_of(result) if r["score"] in (None, "covariance")][-1:]
            for row in shown:
                print(
                    f"  {row['label']}: LDS {row['lds']:.3f} at K={row['K']} "
                    f"{row['seconds']:.1f}s ({time.perf_counter() - started:.0f}s total)",
                    flush=True,
                )
        model_info["results"] = results
        model_info["versus"] = versus(results)
        output["models"][name] = model_info
        print(f"\n{name}: every method (DAUNCE at K={at})")
        print(method_table(results, at))
        print(f"\n{name}: DAUNCE against K — LDS (seconds)")
        print(curve_table(results))
        head = next((r for r in results if r.get("headline")), None)
        if head is not None:
            print(f"\n{name}: {head['label']} (covariance) against each baseline")
            print(versus_table(model_info["versus"], max(p["K"] for p in head["points"])))
    output["total_seconds"] = time.perf_counter() - started
    if args.quick:
        path = CACHE / "lds_quick.json"
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2, default=_json_default) + "\n")
    else:
        path = write_results("lds", json.loads(json.dumps(output, default=_json_default)))
    from plots import plot_lds

    figures = plot_lds(output, CACHE if args.quick else RESULTS)
    print(f"\nwrote {path} and {', '.join(str(f) for f in figures)}")
    print(f"total {output['total_seconds']:.0f} s")


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()

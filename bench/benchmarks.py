"""A registry of attribution benchmarks: model/data pairs with their ground truth for the LDS.

Each benchmark gives the same object (`Benchmark`): the trained base model θ0, its constructor
``make_model(seed)``, its `Task`, the train and query sets, the base L2 strength, the one
training recipe (`TrainConfig`, used for θ0 and for every ground-truth retraining) and
``lds(scores) -> (mean, stderr)`` against the cached ground truth. The benchmarks differ in
data, architecture, loss and optimiser, so that a default chosen by the worst case over them is
not tuned to one of them:

* ``digits-logreg`` — `bench_lds.MODELS["logreg"]` with `bench_lds.prepare`: sklearn digits
  (1597 training examples, 200 queries), softmax regression 64 → 10 (650 parameters), SGD
  momentum 0.9, lr 0.5, 50 epochs, batch 64, L2 1e-3. Convex.
* ``digits-mlp`` — `bench_lds.MODELS["mlp"]`: the same data, MLP 64 → 64 → 10 ReLU (4810
  parameters), SGD lr 0.1, 30 epochs, batch 64, L2 1e-3.
* ``adam-mlp`` — synthetic 10-class data (`teacher_data`): 32 standard normal features, labels
  the argmax of a fixed random teacher (32 → 64 tanh → 10), 10% of them replaced by uniform
  random labels (training and queries alike); 4000 training examples, 400 queries. MLP
  32 → 128 → 10 ReLU (5514 parameters) trained with AdamW (lr 1e-3, cosine, 25 epochs, batch
  128, weight decay 0) and an explicit L2 penalty 1e-3.
* ``diabetes-mlp`` — sklearn's diabetes regression (442 × 10, ships with scikit-learn),
  features and target standardised with the training split's statistics; 342 training
  examples, 100 queries (a seeded permutation). MLP 10 → 32 → 1 tanh (385 parameters),
  `RegressionTask` (loss ½(g − y)²), SGD momentum 0.9, lr 0.01, 100 epochs, batch 32, L2 1e-3.
* ``digits-cnn`` — the digits data reshaped to 1 × 8 × 8: conv 3×3 (16) → tanh → avg-pool 2 →
  conv 3×3 (16) → tanh → avg-pool 2 → linear 64 → 10 (3130 parameters), SGD lr 0.1, 30 epochs,
  batch 64, L2 1e-3. Smooth on purpose: the same net with ReLU and max-pooling fits the
  training set exactly and its ground truth is mostly seed noise (seed agreement 0.28 at L2
  1e-3, 0.48 at 1e-2, against 0.71 for this one).

Ground truth (`daunce_core.evaluation.lds`): M random half-subsets (`lds_subsets`, α = 0.5,
subset seed 0) × S seeds, each model retrained from scratch with the recipe, vectorised (the jobs
of `lds_jobs`: model (m, s) starts from ``make_model(s)`` and visits its subset in an order drawn
from (m, s)); the outcome is each query's negated loss. Default M = 40, S = 1. The digits
benchmarks take theirs from `bench_lds.ground_truth` (its cache, M = 40 × S = 1 already there);
the others are computed here with `retrain_jobs`, one seed at a time, and cached per seed in
``bench/results/cache/bench_truth_NAME_DIGEST_sS.npz``, keyed by everything that determines
them (architecture, task, recipe, L2, M, α, the seed, a digest of the data, torch's version), so
S = 2 reuses S = 1's seed. Seed agreement (`agreement`, the noise ceiling of the LDS: mean
Spearman over queries between two seeds' outcomes over the M subsets) needs a second seed: with
S = 1 it retrains seed 1 on the same subsets (cached the same way, also for the digits
benchmarks) and compares it with seed 0.

Usage: ``.venv/bin/python bench/benchmarks.py [--benchmarks a,b] [--subsets M] [--seeds S]
[--no-agreement]`` prepares each benchmark (ground truth computed and cached where missing)
and prints its size, base quality, ground-truth seconds and seed agreement. Other benches
``from benchmarks import load, BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from common import RESULTS, format_table, machine_info, machine_line
from torch import nn

from daunce_core import ClassificationTask, RegressionTask, TrainConfig
from daunce_core.access.task import Task
from daunce_core.access.torch_module.training import fit
from daunce_core.conversion import to_dict
from daunce_core.evaluation.lds import (
    RetrainJob,
    lds_subsets,
    linear_datamodeling_score,
    retrain_jobs,
)

CACHE = RESULTS / "cache"
ALPHA = 0.5
SUBSET_SEED = 0
TRUTH_VERSION = 1
RETRAIN_GROUP = 100


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


def teacher_data(
    seed: int = 0,
    n: int = 4000,
    m: int = 400,
    features: int = 32,
    hidden: int = 64,
    classes: int = 10,
    noise: float = 0.1,
) -> tuple[dict, dict]:
    """Synthetic classification: x ~ N(0, I), y = argmax of a random tanh teacher, ``noise``
    of the labels replaced by uniform ones; ``(train, queries)``, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(features, hidden, generator=g) / features**0.5
    w2 = torch.randn(hidden, classes, generator=g) / hidden**0.5
    x = torch.randn(n + m, features, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n + m, generator=g) < noise
    y = torch.where(flip, torch.randint(0, classes, (n + m,), generator=g), y)
    return {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


def diabetes_data(num_queries: int = 100, seed: int = 0) -> tuple[dict, dict]:
    """sklearn's diabetes regression, standardised with the training split's statistics."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    split = len(y) - num_queries
    x = (x - x[:split].mean(0)) / x[:split].std(0)
    y = (y - y[:split].mean()) / y[:split].std()
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    return {"x": x[:split], "y": y[:split]}, {"x": x[split:], "y": y[split:]}


def digits_data() -> tuple[dict, dict]:
    """The embedded digits split (`daunce_core.evaluation.datasets.digits`), 1597 / 200."""
    from daunce_core.evaluation.datasets import digits

    return digits()


def adam_mlp(seed: int) -> nn.Module:
    """MLP 32 → 128 → 10 (ReLU), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))


def diabetes_mlp(seed: int) -> nn.Module:
    """MLP 10 → 32 → 1 (tanh), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))


def digits_cnn(seed: int) -> nn.Module:
    """A small conv net on the 8 × 8 digits (flat input reshaped to 1 × 8 × 8)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How to build one benchmark. ``legacy``: a `bench_lds.MODELS` name, prepared (base model
    and ground truth, through its cache) by `bench_lds.prepare`."""

    name: str
    description: str
    data: Callable[[], tuple[dict, dict]]
    make_model: Callable[[int], nn.Module]
    task: Task
    recipe: TrainConfig
    l2: float = 1e-3
    legacy: str | None = None


def _legacy(name: str, key: str, description: str) -> Spec:
    from bench_lds import MODELS

    spec = MODELS[key]
    return Spec(
        name=name,
        description=description,
        data=digits_data,
        make_model=spec.make_model,
        task=ClassificationTask(),
        recipe=spec.recipe,
        l2=spec.l2,
        legacy=key,
    )


def _specs() -> dict[str, Spec]:
    return {
        "digits-logreg": _legacy(
            "digits-logreg", "logreg", "sklearn digits, softmax regression, SGD (convex)"
        ),
        "digits-mlp": _legacy("digits-mlp", "mlp", "sklearn digits, MLP 64-64-10 ReLU, SGD"),
        "adam-mlp": Spec(
            name="adam-mlp",
            description="synthetic teacher data (10% label noise), MLP 32-128-10 ReLU, AdamW",
            data=teacher_data,
            make_model=adam_mlp,
            task=ClassificationTask(),
            recipe=TrainConfig(
                optimizer="adamw", lr=1e-3, weight_decay=0.0, epochs=25, batch_size=128
            ),
        ),
        "diabetes-mlp": Spec(
            name="diabetes-mlp",
            description="sklearn diabetes regression, MLP 10-32-1 tanh, least squares, SGD",
            data=diabetes_data,
            make_model=diabetes_mlp,
            task=RegressionTask(),
            recipe=TrainConfig(lr=0.01, epochs=100, batch_size=32),
        ),
        "digits-cnn": Spec(
            name="digits-cnn",
            description="sklearn digits as 1x8x8 images, conv net (tanh, avg-pool), SGD",
            data=digits_data,
            make_model=digits_cnn,
            task=ClassificationTask(),
            recipe=TrainConfig(lr=0.1, epochs=30, batch_size=64),
        ),
    }


BENCHMARKS = _specs()
"""Every benchmark by name, in a fixed order."""


@dataclass
class Benchmark:
    """One prepared benchmark: θ0, data, recipe and the ground truth of its LDS."""

    name: str
    description: str
    model: nn.Module
    make_model: Callable[[int], nn.Module]
    task: Task
    train: dict
    queries: dict
    l2: float
    recipe: TrainConfig
    subsets: np.ndarray  # [M, n] bool
    outcomes: np.ndarray  # [M, S, m], negated query loss (higher is better)
    info: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        """Number of trainable parameters of θ0."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_train(self) -> int:
        return len(self.train["y"])

    @property
    def m_query(self) -> int:
        return len(self.queries["y"])

    def lds(self, scores: np.ndarray) -> tuple[float, float]:
        """LDS (mean over queries, standard error) of ``scores`` ``[n, m]``."""
        result = linear_datamodeling_score(np.asarray(scores), self.subsets, self.outcomes)
        return float(result.mean), float(result.stderr)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


def _truth_key(spec: Spec, train: dict, queries: dict, count: int, seed: int) -> dict:
    return {
        "benchmark": spec.name,
        "architecture": str(spec.make_model(0)),
        "task": type(spec.task).__name__,
        # Unset (None) fields left out: a field added later with a None default (the old
        # behaviour) keeps the key.
        "recipe": {k: v for k, v in to_dict(spec.recipe).items() if v is not None},
        "l2": spec.l2,
        "M": count,
        "seed": seed,
        "alpha": ALPHA,
        "subset_seed": SUBSET_SEED,
        "outcome": "negated loss",
        "data": _digest(train["x"], train["y"], queries["x"], queries["y"]),
        "torch": torch.__version__,
        "version": TRUTH_VERSION,
    }


def seed_outcomes(
    spec: Spec, train: dict, queries: dict, subsets: np.ndarray, seed: int, compute: bool = True
) -> tuple[np.ndarray, float, bool] | None:
    """Negated query losses ``[M, m]`` of seed ``seed``'s retrainings on ``subsets`` (the jobs
    of `lds_jobs`), the seconds they took and whether they came from the cache; None when not
    cached and ``compute`` is False."""
    key = _truth_key(spec, train, queries, len(subsets), seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"bench_truth_{spec.name}_{digest}_s{seed}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["outcomes"], float(cached["seconds"]), True
    if not compute:
        return None
    jobs = [
        RetrainJob(keep=subsets[m], seed=seed, order=m * 100_003 + seed)
        for m in range(len(subsets))
    ]
    started = time.perf_counter()
    losses = retrain_jobs(
        spec.make_model,
        spec.task,
        train,
        queries,
        jobs,
        spec.recipe,
        l2=spec.l2,
        outcome="loss",
        group_size=RETRAIN_GROUP,
    )
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, outcomes=-losses, seconds=seconds, key=json.dumps(key))
    tmp.replace(path)
    return -losses, seconds, False


def quality(task: Task, model: nn.Module, data: dict) -> dict:
    """Base model quality on ``data``: accuracy and mean loss (classification) or MSE and R²."""
    with torch.no_grad():
        outputs = task.outputs(model, data)
        loss = float(task.loss_from_outputs(outputs, data).mean())
        if isinstance(task, RegressionTask):
            mse = float((outputs - data["y"]).pow(2).mean())
            return {"mse": mse, "r2": 1 - mse / float(data["y"].var(unbiased=False))}
        accuracy = float((outputs.argmax(1) == data["y"]).float().mean())
    return {"accuracy": accuracy, "loss": loss}


def load(name: str, count: int = 40, seeds: int = 1) -> Benchmark:
    """Benchmark ``name`` with θ0 trained and the ground truth of M = ``count`` subsets ×
    S = ``seeds`` seeds (computed and cached where missing)."""
    spec = BENCHMARKS[name]
    if spec.legacy is not None:
        from bench_lds import MODELS, prepare

        bench, old = prepare(MODELS[spec.legacy], count, seeds)
        model, train, queries = bench.model, bench.train, bench.queries
        subsets, outcomes = bench.subsets, bench.outcomes["loss"]
        truth = {"seconds": old["ground_truth"]["seconds"], "cached": old["ground_truth"]["cached"]}
        base_seconds = old["base_training_seconds"]
    else:
        train, queries = spec.data()
        model = spec.make_model(0)
        started = time.perf_counter()
        fit(model, spec.task, train, spec.recipe, l2=spec.l2, seed=0)
        base_seconds = time.perf_counter() - started
        subsets = lds_subsets(len(train["y"]), count, alpha=ALPHA, seed=SUBSET_SEED)
        runs = [seed_outcomes(spec, train, queries, subsets, s) for s in range(seeds)]
        outcomes = np.stack([r[0] for r in runs], axis=1)
        truth = {"seconds": sum(r[1] for r in runs), "cached": all(r[2] for r in runs)}
    bench = Benchmark(
        name=name,
        description=spec.description,
        model=model.eval(),
        make_model=spec.make_model,
        task=spec.task,
        train=train,
        queries=queries,
        l2=spec.l2,
        recipe=spec.recipe,
        subsets=subsets,
        outcomes=outcomes,
    )
    bench.info = {
        "description": spec.description,
        "architecture": str(spec.make_model(0)),
        "task": type(spec.task).__name__,
        "recipe": to_dict(spec.recipe),
        "l2": spec.l2,
        "parameters": bench.parameters,
        "n_train": bench.n_train,
        "m_query": bench.m_query,
        "base_training_seconds": base_seconds,
        "train_quality": quality(spec.task, bench.model, train),
        "query_quality": quality(spec.task, bench.model, queries),
        "ground_truth": {"M": count, "S": seeds, "alpha": ALPHA, **truth},
    }
    return bench


def agreement(bench: Benchmark, compute: bool = True) -> dict | None:
    """Seed agreement of the ground truth: mean Spearman over queries between two seeds'
    outcomes over the M subsets (seeds 0 and 1; seed 1 retrained and cached where S = 1).
    None when S = 1 and seed 1 is not cached and ``compute`` is False."""
    from bench_lds import seed_agreement

    spec = BENCHMARKS[bench.name]
    seconds = 0.0
    if bench.outcomes.shape[1] >= 2:
        pair = bench.outcomes[:, :2]
    else:
        run = seed_outcomes(spec, bench.train, bench.queries, bench.subsets, 1, compute=compute)
        if run is None:
            return None
        pair = np.stack([bench.outcomes[:, 0], run[0]], axis=1)
        seconds = run[1]
    return {"seed_agreement_loss": seed_agreement(pair), "seconds_seed_1": seconds}


def describe(bench: Benchmark) -> list:
    """One table row: name, parameters, n, m, base quality, ground-truth seconds, agreement."""
    q = bench.info["query_quality"]
    shown = (
        f"acc {q['accuracy']:.3f}, loss {q['loss']:.3f}"
        if "accuracy" in q
        else f"MSE {q['mse']:.3f}, R² {q['r2']:.3f}"
    )
    truth = bench.info["ground_truth"]
    agree = bench.info.get("agreement") or {}
    seed_agree = agree.get("seed_agreement_loss")
    return [
        bench.name,
        bench.parameters,
        bench.n_train,
        bench.m_query,
        shown,
        f"{truth['M']}×{truth['S']}",
        f"{truth['seconds']:.0f}{' (cached)' if truth['cached'] else ''}",
        "-" if seed_agree is None else f"{seed_agree:.3f}",
        "-" if not agree.get("seconds_seed_1") else f"{agree['seconds_seed_1']:.0f}",
    ]


HEADERS = [
    "benchmark",
    "params",
    "n",
    "m",
    "query quality",
    "M×S",
    "truth s",
    "seed agreement",
    "seed 1 s",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated")
    parser.add_argument("--subsets", type=int, default=40, help="ground truth: M subsets")
    parser.add_argument("--seeds", type=int, default=1, help="ground truth: S seeds a subset")
    parser.add_argument(
        "--no-agreement", action="store_true", help="skip the seed-1 retraining (S = 1)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line(machine_info()), flush=True)
    rows = []
    for name in args.benchmarks.split(","):
        started = time.perf_counter()
        bench = load(name, args.subsets, args.seeds)
        if not args.no_agreement:
            bench.info["agreement"] = agreement(bench)
        rows.append(describe(bench))
        train_q = bench.info["train_quality"]
        print(
            f"{name}: {bench.parameters} parameters, train {train_q}, query "
            f"{bench.info['query_quality']}, base {bench.info['base_training_seconds']:.1f} s, "
            f"ground truth {bench.info['ground_truth']}, agreement "
            f"{bench.info.get('agreement')} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    print()
    print(format_table(HEADERS, rows))


if __name__ == "__main__":
    main()

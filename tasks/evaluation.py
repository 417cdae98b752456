"""Evaluation tasks: retraining from scratch (LDS ground truth, subset removal), baselines, LDS.

Retraining uses the base model's own recipe (``model.recipe``, ``model.train``, ``model.l2``)
from seeds ``model.seed + s``, many models at once with the vectorised trainer of the copies.
Like the copies, a group of retrainings is one mapped task that writes its jobs' outcomes into a
Zarr `OutcomeStore` before marking them done: a killed task redoes only its pending jobs, and a
larger grid (more subsets, more seeds) trains only the new ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import zarr
from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.access.task import task_from_spec
from daunce_core.access.torch_module.models import build_model
from daunce_core.baselines.methods import baseline_scores
from daunce_core.conversion import from_dict
from daunce_core.errors import DaunceError
from daunce_core.evaluation.lds import (
    RetrainJob,
    group_effects,
    lds_of_effects,
    lds_subsets,
    retrain_jobs,
)
from daunce_core.method.config import TrainConfig
from daunce_core.storage.digest import digest_json
from daunce_core.storage.exports import top_table, write_parquet
from daunce_core.storage.layout import RunLayout, remove_partials
from daunce_core.storage.zarr_store import DONE, OutcomeStore, RunStore
from tasks.common import (
    artifact,
    load_base_model,
    load_columns,
    load_split,
    per_thread,
    retry_transient,
)

LDS_ORDER = 100_003
"""Job ``(m, s)`` of the LDS grid visits its subset in the order keyed ``m·LDS_ORDER + s``."""


@per_thread
def retrain_context(spec: dict) -> dict:
    """Model builder, task, data and recipe of a retraining spec (once per process and thread).

    ``base()`` gives a fresh copy of the base model as the task trains it: θ0, or for a
    language model θ0 with a zero LoRA adapter (the parameters its baselines take gradients
    in).
    """
    if spec.get("kind") == "hf_lora":
        return _language_context(spec)
    recipe, seed = spec["recipe"], spec["model_seed"]
    return {
        "make_model": lambda s: build_model(recipe, seed=seed + s),
        "base": lambda: load_base_model(recipe, spec["model"]["uri"], seed=seed),
        "task": task_from_spec(spec["task"]),
        "train": load_split(spec["train"]["uri"], spec["train"]["digest"]),
        "queries": load_split(spec["queries"]["uri"], spec["queries"]["digest"]),
        "config": from_dict(TrainConfig, spec["train_recipe"], "model.train"),
        "l2": spec["l2"],
        "vectorize": True,
    }


def _language_context(spec: dict) -> dict:
    """A language model's retraining: θ0's LoRA fine-tuning again, from the model before it.

    ``make_model(s)`` is that model with a fresh adapter from seed ``model.seed + s``, so a
    retraining on a subset repeats θ0's recipe (θ0 is ``s = 0`` on all the data). The splits
    are tokenised, with their numeric columns beside (``evaluation.removal.group_by``).
    """
    import copy

    from daunce_core.access.hf_lora.access import encode
    from daunce_core.access.hf_lora.base import head_task, num_labels, parse_recipe
    from daunce_core.access.hf_lora.models import add_lora, context_window, load_model

    task_spec, seed = spec["task"], spec["model_seed"]
    columns = {
        split: load_columns(spec[split]["uri"], spec[split]["digest"])
        for split in ("train", "queries")
    }
    labels = num_labels(task_spec, *columns.values())
    lora = parse_recipe(spec["recipe"]).lora
    start, tokenizer = load_model(spec["pretrained"], task_spec["kind"], num_labels=labels)
    theta0, _ = load_model(spec["model"]["uri"], task_spec["kind"], num_labels=labels)
    window = context_window(start)
    data = {}
    for split, values in columns.items():
        numbers = {k: torch.as_tensor(v) for k, v in values.items() if v.dtype.kind in "iufb"}
        data[split] = numbers | encode(task_spec, tokenizer, values, window, f"data.{split}")
    return {
        "make_model": lambda s: add_lora(copy.deepcopy(start), lora, seed=seed + s),
        "base": lambda: add_lora(copy.deepcopy(theta0), lora, seed=seed),
        "task": head_task(task_spec),
        "train": data["train"],
        "queries": data["queries"],
        "config": from_dict(TrainConfig, spec["train_recipe"], "model.train"),
        "l2": spec["l2"],
        "vectorize": task_spec["kind"] == "causal_lm",
    }


def _retrain(spec: dict, jobs: list[RetrainJob]) -> np.ndarray:
    context = retrain_context(spec)
    return retrain_jobs(
        context["make_model"],
        context["task"],
        context["train"],
        context["queries"],
        jobs,
        context["config"],
        l2=context["l2"],
        outcome=spec["outcome"],
        group_size=len(jobs),
        vectorize=context["vectorize"],
    )


def num_queries(spec: dict) -> int:
    """m, the number of queries of a retraining spec."""
    index = Path(spec["queries"]["uri"]) / "index.parquet"
    return pl.read_parquet(index, columns=["example_id"]).height


@task(name="prepare-truth", cache_policy=NO_CACHE)
def prepare_truth(
    truth_dir: str, spec: dict, subsets: dict, grid: list[int], key: str
) -> list[list[int]]:
    """Grow the LDS ground truth's store to ``grid = [M, S]``; return its pending jobs.

    Writes the ``[M, n]`` subset masks beside the outcomes (`OutcomeStore.write_subsets`).
    """
    remove_partials(truth_dir)
    store = OutcomeStore(truth_dir)
    store.ensure(tuple(grid), num_queries(spec), key)
    store.write_subsets(lds_subsets(spec["num_train"], grid[0], subsets["alpha"], subsets["seed"]))
    status = store.status()
    return [[m, s] for m in range(grid[0]) for s in range(grid[1]) if status[m, s] != DONE]


def _pairs_name() -> str:
    from prefect.runtime import task_run

    pairs = task_run.parameters["pairs"]
    return f"ground-truth-{pairs[0][0]}.{pairs[0][1]}-{pairs[-1][0]}.{pairs[-1][1]}"


@task(
    name="ground-truth",
    task_run_name=_pairs_name,
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def ground_truth(pairs: list[list[int]], truth_dir: str, spec: dict, subsets: dict) -> dict:
    """Retrain LDS jobs ``(m, s)`` — subset m, seed s — and write their query outcomes.

    Not cached by Prefect: each job's status in the store is its done signal, and jobs already
    done are skipped. A job's outcome does not depend on the jobs trained with it. ``subsets``
    holds ``alpha`` and ``seed`` of `daunce_core.evaluation.lds.lds_subsets`.
    """
    started = time.perf_counter()
    store = OutcomeStore(truth_dir)
    status = store.status()
    todo = [(m, s) for m, s in pairs if status[m, s] != DONE]
    if todo:
        n = spec["num_train"]
        masks = lds_subsets(n, max(m for m, _ in pairs) + 1, subsets["alpha"], subsets["seed"])
        jobs = [RetrainJob(keep=masks[m], seed=s, order=m * LDS_ORDER + s) for m, s in todo]
        for (m, s), row in zip(todo, _retrain(spec, jobs), strict=True):
            store.write((m, s), row)
    return {"pairs": pairs, "trained": todo, "seconds": time.perf_counter() - started}


def _jobs_name() -> str:
    from prefect.runtime import task_run

    index = task_run.parameters["index"]
    return f"retrain-{Path(task_run.parameters['store_dir']).name}-{index[0]}-{index[-1]}"


@task(
    name="retrain",
    task_run_name=_jobs_name,
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def retrain(index: list[int], store_dir: str, spec: dict, described: dict) -> dict:
    """Retrain jobs ``index`` of a flat `OutcomeStore` (subset removal); write their outcomes.

    ``described`` maps each job's row to its removed training rows (``removed``), ``seed`` and
    ``order`` key; as in `ground_truth`, jobs already done are skipped (uncached).
    """
    started = time.perf_counter()
    store = OutcomeStore(store_dir)
    status = store.status()
    todo = [i for i in index if status[i] != DONE]
    if todo:
        n = spec["num_train"]
        built = []
        for i in todo:
            job, keep = described[i], np.ones(n, dtype=bool)
            keep[np.asarray(job["removed"], dtype=np.int64)] = False
            built.append(RetrainJob(keep=keep, seed=job["seed"], order=job["order"]))
        for i, row in zip(todo, _retrain(spec, built), strict=True):
            store.write((i,), row)
    return {"index": index, "trained": todo, "seconds": time.perf_counter() - started}


def read_scores(source: dict, shape: tuple[int, int]):
    """Open a score matrix: ``{"kind": "zarr" | "npy" | "npz", "path": ...}``; check its shape."""
    path = source["path"]
    if not Path(path).exists():
        raise DaunceError(f"the score matrix {path!r} of {source['name']!r} does not exist.")
    kind = source["kind"]
    if kind == "zarr":
        matrix = zarr.open_array(store=path, mode="r")
    elif kind == "npy":
        matrix = np.load(path, mmap_mode="r")
    elif kind == "npz":
        with np.load(path) as archive:
            if "scores" not in archive:
                raise DaunceError(f"{path} holds no array named 'scores' (has {archive.files}).")
            matrix = archive["scores"]
    else:
        raise DaunceError(f"score files must be .npy, .npz or a Zarr array; got {path!r}.")
    if tuple(matrix.shape) != tuple(shape):
        raise DaunceError(
            f"the scores of {source['name']!r} have shape {tuple(matrix.shape)}; this run needs "
            f"[n_train, m_query] = {list(shape)} (rows in the training data's order)."
        )
    return matrix


def score_source(name: str, path: str) -> dict:
    """The source record of a score file or array, its kind told by its suffix."""
    suffix = Path(path).suffix
    kind = {".npy": "npy", ".npz": "npz"}.get(suffix, "zarr")
    return {"name": name, "path": str(path), "kind": kind}


@task(name="lds", task_run_name="lds-{source[name]}", cache_policy=NO_CACHE)
def lds_of_scores(source: dict, truth_dir: str, grid: list[int], subsets: dict) -> dict:
    """LDS of one score matrix against the first ``grid = [M, S]`` ground-truth retrainings.

    Returns the mean, its standard error and the per-query Spearman correlations. Not cached:
    it reads the scores and outcomes as they are now (seconds even for large runs).
    """
    store = OutcomeStore(truth_dir)
    outcomes = -store.outcomes(tuple(grid)).mean(axis=1)  # stored lower-is-better
    n = int(zarr.open_array(store=str(Path(truth_dir) / "subsets"), mode="r").shape[1])
    masks = lds_subsets(n, grid[0], subsets["alpha"], subsets["seed"])
    matrix = read_scores(source, (n, outcomes.shape[1]))
    result = lds_of_effects(group_effects(matrix, masks), outcomes)
    return {
        "name": source["name"],
        "mean": result.mean,
        "stderr": result.stderr,
        "per_query": [None if not np.isfinite(v) else float(v) for v in result.per_query],
        "subsets": grid[0],
        "seeds": grid[1],
    }


@task(
    name="baseline-scores",
    task_run_name="baseline-{name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_transient,
)
def baseline(
    name: str,
    method: str,
    options: dict,
    out_dir: str,
    spec: dict,
    top_k: int,
    device: str = "cpu",
) -> dict:
    """A baseline's scores ``[n_train, m_query]`` into Zarr, and its top-k tables into Parquet.

    Stored like DAUNCE's (``<out_dir>/store/scores`` and ``<out_dir>/exports/``), with the
    method's name in the tables, so one SQL query compares methods. ``device`` (where the
    gradients are computed) is not part of what the scores depend on.
    """
    started = time.perf_counter()
    context = retrain_context(spec)
    scores = baseline_scores(
        method,
        context["base"](),
        context["task"],
        context["train"],
        context["queries"],
        l2=spec["l2"],
        make_model=context["make_model"],
        train_config=context["config"],
        seed=0,
        options=options,
        device=device,
    )
    if not np.isfinite(scores).all():
        raise DaunceError(f"the baseline {name!r} produced non-finite scores; check its options.")
    seconds = time.perf_counter() - started
    out = RunLayout(out_dir)
    store = RunStore(out.store)
    n, m = scores.shape
    array = store.create_scores(n, m, 8192, 1024)
    array[:] = scores.astype(np.float32)
    train_ids, query_ids = (
        pl.read_parquet(Path(spec[split]["uri"]) / "index.parquet")["example_id"].to_numpy()
        for split in ("train", "queries")
    )
    for view, largest in (("top_proponents", True), ("top_opponents", False)):
        frame = top_table(array, spec["run_id"], train_ids, query_ids, top_k, largest, name)
        write_parquet(frame, out.export(view))
    digest = digest_json({"method": method, "options": options, "spec": spec})
    record = artifact(
        store.root / "scores",
        f"scores/{name}",
        digest,
        "baseline-scores",
        inputs=[spec["model"]["uri"], spec["train"]["uri"], spec["queries"]["uri"]],
        shape=[n, m],
    )
    return record | {"name": name, "seconds": seconds}

"""Perturbed copies: train a group, evaluate its losses into rows of the Zarr loss arrays."""

from __future__ import annotations

import json
import os
import time

import torch
from prefect import task
from safetensors.torch import load_file, save_file

from daunce_core.storage.zarr_store import DIVERGED, DONE, PENDING, RunStore
from tasks.common import CACHE_POLICY, Layout, copies_context


def _save_copies(layout: Layout, ks: list[int], params: dict) -> None:
    layout.copy(ks[0]).parent.mkdir(parents=True, exist_ok=True)
    for g, k in enumerate(ks):
        save_file({name: p[g].contiguous() for name, p in params.items()}, str(layout.copy(k)))


def _run_name() -> str:
    from prefect.runtime import task_run

    ks = task_run.parameters["ks"]
    return f"train-copies-{ks[0]}-{ks[-1]}"


def _lost(store: RunStore, layout: Layout, k: int, status: int) -> bool:
    """A finished copy that needs new query columns but whose parameters are gone: retrain it.

    The copies are a cache, the seeds the truth: copy k is recomputed from (seed, k).
    """
    behind = store.queries_done([k])[0] < store.open("losses_query").shape[1]
    return status == DONE and behind and not layout.copy(k).exists()


def _add_new_queries(store: RunStore, layout: Layout, ks, status, context: str) -> list[int]:
    """Evaluate finished copies on queries added since they were trained; return their ids."""
    counts = dict(zip(ks, store.queries_done(ks), strict=True))
    total = store.open("losses_query").shape[1]
    behind = [k for k in ks if status[k] == DONE and counts[k] < total]
    for start in sorted({int(counts[k]) for k in behind}):
        group = [k for k in behind if counts[k] == start]
        files = [load_file(str(layout.copy(k))) for k in group]
        params = {name: torch.stack([f[name] for f in files]) for name in files[0]}
        values = copies_context(context).measure_queries(params, start)
        for row, k in enumerate(group):
            store.write_query_columns(k, start, values[row])
    return behind


@task(
    name="train-copies",
    task_run_name=_run_name,
    cache_policy=CACHE_POLICY,
    persist_result=True,
    retries=2,
    retry_delay_seconds=[2, 10],
)
def train_copies(ks: list[int], run_dir: str, spec: dict) -> dict:
    """Train copies ``ks`` together and write their loss rows; copies already done are skipped.

    Idempotent: rows are written before the copies are marked done, so a copy killed mid-way is
    still pending and is redone, from its seed, on the next run. ``spec`` holds the digests of
    everything the copies depend on (data, base model, signals, configuration).
    """
    started = time.perf_counter()
    layout = Layout.of_run(run_dir)
    store = RunStore(layout.store)
    status = dict(zip(ks, store.status(ks), strict=True))
    todo = [k for k in ks if status[k] == PENDING or _lost(store, layout, k, status[k])]
    context = json.dumps(spec, sort_keys=True)
    if todo:
        # The whole group is retrained (vectorised copies are computed exactly as in an
        # uninterrupted run); only its pending rows are written.
        copies = copies_context(context)
        trained = copies.train_group(ks)
        rows = copies.evaluate(ks, trained)
        keep = [g for g, k in enumerate(ks) if k in todo]
        params = {name: p[keep] for name, p in trained.params.items()}
        _save_copies(layout, todo, params)
        store.write_rows(todo, rows.train[keep], rows.query[keep], rows.diverged[keep])
        status = dict(zip(ks, store.status(ks), strict=True))
    behind = _add_new_queries(store, layout, ks, status, context)
    diverged = [k for k in ks if status[k] == DIVERGED]
    return {
        "ks": list(ks),
        "trained": todo,
        "process": os.getpid(),
        "queries_added_to": behind,
        "diverged": diverged,
        "seconds": time.perf_counter() - started,
    }

"""Perturbed copies: a group brought to done (loss rows in the run's Zarr store), then reflected.

With ``score: subspace`` a second mapped task measures each finished copy's reflection (an API
run first samples its curvature probes, once).
"""

from __future__ import annotations

import dataclasses
import os
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.storage.copies import RunCopies
from daunce_core.storage.layout import RunLayout
from daunce_core.storage.reflections import RunReflections
from tasks.common import copy_access, retry_transient


def _run_name() -> str:
    from prefect.runtime import task_run

    ks = task_run.parameters["ks"]
    return f"train-copies-{ks[0]}-{ks[-1]}"


@task(
    name="train-copies",
    task_run_name=_run_name,
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def train_copies(ks: list[int], run_dir: str, spec: dict, query_digests: list[str]) -> dict:
    """Bring copies ``ks`` to done: train, measure or verify only what is missing.

    Not cached by Prefect: each copy's record (`daunce_core.storage.records`) is its one done
    signal, so a group whose copies are all done and intact costs a few file reads. ``spec``
    holds the digests of everything the copies depend on (data, base model, signals, settings)
    and how they are computed; ``query_digests`` the per-example digests of the queries.
    """
    started = time.perf_counter()
    access = copy_access(spec)
    report = RunCopies(access, RunLayout(run_dir), query_digests).complete(ks)
    return dataclasses.asdict(report) | {
        "process": os.getpid(),
        "seconds": time.perf_counter() - started,
    }


def _reflections_name() -> str:
    from prefect.runtime import task_run

    ks = task_run.parameters["ks"]
    return f"reflect-copies-{ks[0]}-{ks[-1]}"


@task(
    name="reflect-copies",
    task_run_name=_reflections_name,
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def reflect_copies(ks: list[int], run_dir: str, spec: dict, query_digests: list[str]) -> dict:
    """Measure the reflections ``θ0 − Δ_k`` of finished copies ``ks`` (``score: subspace``).

    Not cached by Prefect: each copy's marker (`daunce_core.storage.reflections`) is its done
    signal, so intact copies cost a few reads; the others are measured from their saved
    parameters (no training).
    """
    started = time.perf_counter()
    layout = RunLayout(run_dir)
    report = RunReflections(copy_access(spec), layout, query_digests).complete(ks)
    return dataclasses.asdict(report) | {
        "process": os.getpid(),
        "seconds": time.perf_counter() - started,
    }


@task(
    name="prepare-reflections",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def prepare_reflections(run_dir: str, spec: dict, query_digests: list[str]) -> None:
    """What every copy's reflection is measured against, made once before the groups run.

    An API run's curvature probes (completions sampled from θ0) and θ0's losses, kept in the
    run's store (`daunce_core.storage.reflections.RunReflections.prepare`); kept ones are read.
    """
    RunReflections(copy_access(spec), RunLayout(run_dir), query_digests).prepare()

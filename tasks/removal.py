"""Subset-removal tasks: plan the retrainings of every method, then summarise their outcomes.

The plan (`daunce_core.evaluation.removal.plan_removal`) is deterministic given the scores, the
query groups and the settings, so the summary recomputes it instead of storing it. Every job —
a set of removed training rows, a seed and a visiting order — has one row in the run's removal
store (`OutcomeStore`), keyed by its content, so jobs shared by methods (the full-data and the
random removals) are trained once, and a larger plan trains only its new jobs.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.errors import DaunceError
from daunce_core.evaluation.removal import (
    correct_queries,
    plan_removal,
    query_groups,
    summarize_removal,
)
from daunce_core.storage.digest import digest_json
from daunce_core.storage.exports import write_parquet
from daunce_core.storage.layout import RunLayout, remove_partials
from daunce_core.storage.zarr_store import DONE, OutcomeStore
from tasks.evaluation import num_queries, read_scores, retrain_context


def _groups(spec: dict, settings: dict) -> list[np.ndarray]:
    """Groups of the queries the base model answers correctly."""
    context = retrain_context(spec)
    correct = correct_queries(context["base"](), context["task"], context["queries"])
    labels, group_by = None, settings["group_by"]
    if group_by is not None:
        if group_by not in context["queries"]:
            raise DaunceError(
                f"evaluation.removal.group_by: the queries have no column {group_by!r} "
                f"(columns: {sorted(context['queries'])}); name one, or set it to null for one "
                "group of all correctly answered queries."
            )
        labels = context["queries"][group_by].numpy()
    groups = query_groups(
        correct, labels, max_per_group=settings["per_group"], seed=settings["seed"]
    )
    return groups[: settings["max_groups"]] if settings["max_groups"] else groups


def _plans(spec: dict, sources: list[dict], settings: dict, groups) -> dict:
    """One removal plan per method, from its scores on the groups' queries."""
    n, m = spec["num_train"], num_queries(spec)
    columns = np.unique(np.concatenate(groups))
    plans = {}
    for source in sources:
        matrix = read_scores(source, (n, m))
        picked = matrix.oindex[:, columns] if source["kind"] == "zarr" else matrix[:, columns]
        scores = np.zeros((n, m))  # only the groups' columns enter a plan
        scores[:, columns] = np.asarray(picked, dtype=np.float64)
        plans[source["name"]] = plan_removal(
            scores,
            groups,
            settings["sizes"],
            settings["seeds"],
            random_trials=settings["random_trials"],
            seed=settings["seed"],
            share_random=settings["share_random"],
        )
    return plans


def _job(plan, j: int) -> dict:
    job = plan.jobs[j]
    return {
        "removed": np.sort(plan.removed(j)).tolist(),
        "seed": int(job.seed),
        "order": int(job.order),
    }


def _job_key(job: dict) -> str:
    return digest_json(job)


def _rows(folder, spec: dict, plans: dict) -> dict[str, int]:
    """The removal store's row of every job of every plan (grown for new jobs)."""
    remove_partials(folder)
    index_path = folder / "jobs.json"
    key = digest_json({k: v for k, v in spec.items() if k != "run_id"})
    index = json.loads(index_path.read_text()) if index_path.exists() else {"key": key, "jobs": {}}
    if index["key"] != key:
        raise DaunceError(
            f"the removal retrainings in {folder} were made from other inputs; delete that "
            "folder to start over."
        )
    for plan in plans.values():
        for j in range(len(plan.jobs)):
            index["jobs"].setdefault(_job_key(_job(plan, j)), len(index["jobs"]))
    OutcomeStore(folder).ensure((len(index["jobs"]),), num_queries(spec), key)
    folder.mkdir(parents=True, exist_ok=True)
    partial = index_path.with_name(index_path.name + ".partial")
    partial.write_text(json.dumps(index, indent=1))
    partial.replace(index_path)  # written after the store has grown: rows always exist
    return index["jobs"]


@task(name="plan-removal", cache_policy=NO_CACHE)
def plan_removal_jobs(run_dir: str, spec: dict, sources: list[dict], settings: dict) -> dict:
    """Plan every method's removals; grow the removal store; return the jobs and the pending.

    Returns ``folder`` (the store), ``groups`` (query ids per group), ``described`` (row →
    removed rows, seed, order) and ``pending`` (rows not done yet).
    """
    folder = RunLayout(run_dir).removal
    groups = _groups(spec, settings)
    plans = _plans(spec, sources, settings, groups)
    rows = _rows(folder, spec, plans)
    described = {
        rows[_job_key(_job(plan, j))]: _job(plan, j)
        for plan in plans.values()
        for j in range(len(plan.jobs))
    }
    status = OutcomeStore(folder).status()
    return {
        "folder": str(folder),
        "groups": [g.tolist() for g in groups],
        "described": described,
        "pending": [row for row in sorted(described) if status[row] != DONE],
    }


@task(name="summarize-removal", cache_policy=NO_CACHE)
def summarize_removal_jobs(
    run_dir: str, spec: dict, sources: list[dict], settings: dict, run_id: str
) -> list[dict]:
    """The flipped fractions of every method's removals (and random, full); to Parquet too."""
    layout = RunLayout(run_dir)
    groups = _groups(spec, settings)
    plans = _plans(spec, sources, settings, groups)
    rows = _rows(layout.removal, spec, plans)
    outcomes = OutcomeStore(layout.removal).outcomes()
    table = []
    for name, plan in plans.items():
        errors = outcomes[[rows[_job_key(_job(plan, j))] for j in range(len(plan.jobs))]]
        for row in summarize_removal(plan, errors).summary():
            if row["kind"] == "top":
                table.append({"method": name} | row)
            elif name == sources[0]["name"]:  # full and random jobs are the same for all
                table.append({"method": row["kind"]} | row)
    frame = pl.DataFrame(table).with_columns(
        run_id=pl.lit(run_id), groups=pl.lit(len(groups)), seeds=pl.lit(settings["seeds"])
    )
    write_parquet(frame, layout.evaluation("removal"))
    return table

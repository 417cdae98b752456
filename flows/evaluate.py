"""Evaluation flows: the linear datamodeling score (``lds``) and subset removal (``removal``).

Both start from a run configuration, make sure its DAUNCE scores exist (the attribute flow's
tasks, served from cache when done), compute the configured baselines into the same layout as
DAUNCE's scores, then:

* ``lds``: ground truth — M random subsets × S seeds retrained from scratch, as mapped tasks
  writing into a shared, content-addressed Zarr store (``<workspace>/truth/<digest>``; M and S
  can grow later) — then the LDS of every method against it;
* ``removal``: for each method and each group of correctly answered queries, the top-N
  training examples removed and the model retrained from several seeds, against random
  removals of the same N (`daunce_core.evaluation.removal`).

Results go to Parquet under the run folder (``evaluations/``), with views in the lineage
database (``lds_results``, ``lds_per_query``, ``removal_results``), and into its
``evaluations`` table.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
from prefect import flow

from daunce_core.access import REMOTE_KINDS
from daunce_core.conversion import from_dict, to_dict
from daunce_core.errors import DaunceError
from daunce_core.storage.digest import digest_json, digest_path
from daunce_core.storage.exports import write_parquet
from daunce_core.storage.layout import RunLayout, Workspace
from daunce_core.storage.lineage import Lineage
from flows.attribute import (
    _call,
    _inputs,
    _locked_attribute,
    _task_runner,
)
from flows.config import RunConfig
from flows.fanout import groups_of, map_groups
from flows.lock import workspace_lock
from tasks.evaluation import baseline, ground_truth, lds_of_scores, prepare_truth, score_source
from tasks.removal import plan_removal_jobs, summarize_removal_jobs


def retrain_spec(run: RunConfig, records: dict, outcome: str) -> dict:
    """Everything a retraining from scratch depends on: data, recipe, training, outcome."""

    def pick(record: dict) -> dict:
        return {"uri": record["uri"], "digest": record["digest"]}

    language = {}
    if run.model.access == "hf_lora":  # retrained from the model θ0 was fine-tuned from
        language = {"kind": "hf_lora", "pretrained": records["model"]["pretrained"]}
    return language | {
        "recipe": run.model.recipe,
        "model_seed": run.model.seed,
        "task": run.task,
        "train_recipe": to_dict(run.model.train),
        "l2": run.model.l2,
        "train": pick(records["train"]),
        "queries": pick(records["queries"]),
        "model": pick(records["model"]),
        "num_train": records["train"]["count"],
        "outcome": outcome,
        "run_id": run.run_id(),
    }


def _methods(run: RunConfig, run_dir: Path, spec: dict, states: list) -> list[dict]:
    """Score sources of every method: DAUNCE's, each configured baseline's, the user's files."""
    scores = RunLayout(run_dir).scores
    sources = [score_source("daunce", str(scores)) | {"digest": digest_path(scores)}]
    records: dict = {}
    for config in run.evaluation.baselines:
        out_dir = RunLayout(run_dir).baseline(config.name).root
        record = _call(
            records,
            states,
            f"baseline-{config.name}",
            baseline,
            config.name,
            config.method,
            config.options,
            str(out_dir),
            {k: v for k, v in spec.items() if k != "outcome"},
            run.exports.top_k,
            artefact=RunLayout(out_dir).scores,
            root=RunLayout(run_dir).workspace.root,
            device=str(run.compute.torch_device),
        )
        print(f"baseline {config.name}: scores in {record['seconds']:.1f}s")
        sources.append(score_source(config.name, record["uri"]) | {"digest": record["digest"]})
    for score_file in run.evaluation.scores:
        source = score_source(score_file.name, score_file.path)
        if not Path(source["path"]).exists():
            raise DaunceError(
                f"evaluation.scores {score_file.name!r}: {score_file.path} does not exist."
            )
        sources.append(source | {"digest": digest_path(source["path"])})
    return sources


def _prepare(run: RunConfig, overwrite: bool, states: list) -> tuple:
    """The attribute run (cached when done), then the records of its inputs."""
    if run.model.access in REMOTE_KINDS:
        kind = run.model.access
        raise DaunceError(
            "daunce lds and daunce removal retrain the model from its recipe, which a model "
            f"behind a server has not got (only θ0 is reachable there). Evaluate a {kind} run's "
            "scores against a white-box run of the same model instead: `daunce lds "
            f"<white-box config> --scores {kind}=<{kind} run>/store/scores` "
            f"(bench/bench_{kind}.py)."
        )
    summary = _locked_attribute(run, overwrite)
    workspace = Path(run.workspace)
    layout = Workspace(workspace)
    records = _inputs(run, layout, states)
    return summary, layout, records


def _ground_truth(run: RunConfig, layout: Workspace, spec: dict, states: list) -> tuple:
    """Retrain the pending LDS jobs, mapped in groups; return the truth folder and the grid."""
    lds = run.evaluation.lds
    subsets = {"alpha": lds.alpha, "seed": lds.seed}
    key = digest_json({"spec": {k: v for k, v in spec.items() if k != "run_id"}, **subsets})
    truth_dir = layout.truth(key)
    grid = [lds.subsets, lds.seeds]
    pending = prepare_truth(str(truth_dir), spec, subsets, grid, key)
    pairs = [[m_, s] for m_ in range(lds.subsets) for s in range(lds.seeds)]
    task = ground_truth.with_options(retries=run.execution.retries)
    shared = {"truth_dir": str(truth_dir), "spec": spec, "subsets": subsets}
    groups = groups_of(pending, lds.group_size)
    done = len(pairs) - len(pending)
    for group, result, state in map_groups(
        task, groups, "ground truth", done, len(pairs), **shared
    ):
        states.append(
            {"task": "ground-truth", "key": f"{group[0]}-{group[-1]}", "status": state}
            | {"seconds": result["seconds"]}
        )
    return truth_dir, [lds.subsets, lds.seeds], subsets, key


def _query_ids(spec: dict) -> np.ndarray:
    index = Path(spec["queries"]["uri"]) / "index.parquet"
    return pl.read_parquet(index, columns=["example_id"])["example_id"].to_numpy()


@flow(name="lds", log_prints=True)
def lds_flow(config: dict, overwrite: bool = False) -> dict:
    """The LDS of DAUNCE's scores, the configured baselines and the user's score files."""
    run = from_dict(RunConfig, config, "")
    with workspace_lock(Path(run.workspace)):
        return _lds(run, overwrite)


def _lds(run: RunConfig, overwrite: bool) -> dict:
    started, states = time.perf_counter(), []
    summary, layout, records = _prepare(run, overwrite, states)
    outcome = run.evaluation.lds.outcome or run.daunce.measurement
    spec = retrain_spec(run, records, outcome)
    run_dir = Path(summary["run_dir"])
    sources = _methods(run, run_dir, spec, states)
    truth_dir, grid, subsets, truth_key = _ground_truth(run, layout, spec, states)
    results = []
    for source in sources:
        state = lds_of_scores(
            {k: v for k, v in source.items() if k != "digest"},
            str(truth_dir),
            grid,
            subsets,
            return_state=True,
        )
        results.append(state.result())
        states.append({"task": "lds", "key": source["name"], "status": state.name, "seconds": 0.0})
    frames = _write_lds(run, run_dir, spec, results, outcome, truth_key)
    _record_lds(run, results, outcome, truth_dir, frames)
    seconds = time.perf_counter() - started
    for r in results:
        print(f"LDS ({outcome}) {r['name']}: {r['mean']:.3f} ± {r['stderr']:.3f}")
    return {
        "run_id": run.run_id(),
        "run_dir": str(run_dir),
        "truth_dir": str(truth_dir),
        "outcome": outcome,
        "grid": grid,
        "results": {r["name"]: {"mean": r["mean"], "stderr": r["stderr"]} for r in results},
        "states": {f"{s['task']}[{s['key']}]": s["status"] for s in states},
        "seconds": seconds,
    }


def _write_lds(run, run_dir: Path, spec: dict, results: list, outcome: str, truth_key: str):
    ids = _query_ids(spec)
    summary = pl.DataFrame(
        {
            "run_id": [run.run_id()] * len(results),
            "method": [r["name"] for r in results],
            "outcome": [outcome] * len(results),
            "lds": [r["mean"] for r in results],
            "stderr": [r["stderr"] for r in results],
            "subsets": [r["subsets"] for r in results],
            "seeds": [r["seeds"] for r in results],
            "truth": [truth_key[:16]] * len(results),
        }
    )
    per_query = pl.concat(
        [
            pl.DataFrame(
                {
                    "run_id": [run.run_id()] * len(ids),
                    "method": [r["name"]] * len(ids),
                    "outcome": [outcome] * len(ids),
                    "query_id": ids,
                    "spearman": pl.Series(r["per_query"], dtype=pl.Float64),
                }
            )
            for r in results
        ]
    )
    run_layout = RunLayout(run_dir)
    write_parquet(summary, run_layout.evaluation(f"lds-{outcome}"))
    write_parquet(per_query, run_layout.evaluation(f"lds_per_query-{outcome}"))
    return {"lds": summary, "per_query": per_query}


def _record_lds(run: RunConfig, results: list, outcome: str, truth_dir: Path, frames) -> None:
    lineage = Lineage(Workspace(run.workspace).lineage)
    for r in results:
        lineage.record_evaluation(
            run.run_id(),
            f"lds/{outcome}",
            r["mean"],
            {"subsets": r["subsets"], "seeds": r["seeds"], "truth": str(truth_dir)},
            method=r["name"],
            stderr=r["stderr"],
        )
    lineage.create_views(Workspace(run.workspace).runs)


def _on_runner(run: RunConfig, fn, overwrite: bool) -> dict:
    return fn.with_options(task_runner=_task_runner(run))(to_dict(run), overwrite=overwrite)


def run_lds(config: RunConfig, overwrite: bool = False) -> dict:
    """Run `lds_flow` for ``config`` on the task runner its execution settings name."""
    return _on_runner(config, lds_flow, overwrite)


@flow(name="subset-removal", log_prints=True)
def removal_flow(config: dict, overwrite: bool = False) -> dict:
    """Subset removal for DAUNCE's scores, the configured baselines and the user's files."""
    run = from_dict(RunConfig, config, "")
    with workspace_lock(Path(run.workspace)):
        return _removal(run, overwrite)


def _run_removal_jobs(run: RunConfig, plan: dict, spec: dict, states: list) -> None:
    """Retrain every pending job, in batches of equal size (mapped tasks)."""
    from tasks.evaluation import retrain

    described = {int(row): job for row, job in plan["described"].items()}
    by_size: dict[int, list[int]] = {}
    for row in sorted(plan["pending"]):
        by_size.setdefault(len(described[row]["removed"]), []).append(row)
    size = run.evaluation.removal.group_size
    batches = [b for members in by_size.values() for b in groups_of(members, size)]
    task = retrain.with_options(retries=run.execution.retries)
    shared = {"store_dir": plan["folder"], "spec": spec, "described": described}
    total = len(described)
    done = total - len(plan["pending"])
    for batch, result, state in map_groups(task, batches, "subset removal", done, total, **shared):
        states.append(
            {"task": "retrain", "key": f"{batch[0]}-{batch[-1]}", "status": state}
            | {"seconds": result["seconds"]}
        )


def _removal(run: RunConfig, overwrite: bool) -> dict:
    started, states = time.perf_counter(), []
    summary, _, records = _prepare(run, overwrite, states)
    spec = retrain_spec(run, records, "error")
    run_dir = Path(summary["run_dir"])
    sources = _methods(run, run_dir, spec, states)
    settings = to_dict(run.evaluation.removal)
    plan = plan_removal_jobs(str(run_dir), spec, sources, settings)
    _run_removal_jobs(run, plan, spec, states)
    table = summarize_removal_jobs(str(run_dir), spec, sources, settings, run.run_id())
    _record_removal(run, table, len(plan["groups"]))
    return {
        "run_id": run.run_id(),
        "run_dir": str(run_dir),
        "groups": plan["groups"],
        "jobs": len(plan["described"]),
        "table": table,
        "states": {f"{s['task']}[{s['key']}]": s["status"] for s in states},
        "seconds": time.perf_counter() - started,
    }


def _record_removal(run: RunConfig, table: list[dict], groups: int) -> None:
    lineage = Lineage(Workspace(run.workspace).lineage)
    for row in table:
        if row["kind"] != "full":
            lineage.record_evaluation(
                run.run_id(),
                f"removal/flipped@{row['size']}",
                row["mean"],
                {"groups": groups, "seeds": run.evaluation.removal.seeds, "units": row["units"]},
                method=row["method"],
                stderr=row["stderr"],
            )
    lineage.create_views(Workspace(run.workspace).runs)


def run_removal(config: RunConfig, overwrite: bool = False) -> dict:
    """Run `removal_flow` for ``config`` on the task runner its execution settings name."""
    return _on_runner(config, removal_flow, overwrite)


@flow(name="evaluate-from-file", log_prints=True)
def evaluate_from_file(config_path: str, test: str = "lds", overwrite: bool = False) -> dict:
    """The ``lds`` or ``removal`` test for a YAML configuration file (for deployments)."""
    from flows.config import load_config

    runners = {"lds": run_lds, "removal": run_removal}
    if test not in runners:
        raise DaunceError(f"test must be 'lds' or 'removal'; got {test!r}.")
    return runners[test](load_config(config_path), overwrite=overwrite)

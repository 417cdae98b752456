"""The ``attribute`` flow: from a run configuration to scores, exports and lineage.

prepare data (train, queries) → base model → base signals → K copies, in groups, mapped over the
task runner (each group: draw → train → evaluate → rows of the Zarr loss arrays) → scores →
Parquet exports → lineage in DuckDB. Every step is a cached task keyed by content digests, so a
rerun computes nothing, a killed run redoes only unfinished copies, and a larger K trains only
the new copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow

from daunce_core.access import KINDS, REMOTE_KINDS
from daunce_core.access.api.config import parse_api_recipe
from daunce_core.access.prompt.config import parse_prompt_recipe
from daunce_core.conversion import from_dict, to_dict
from daunce_core.errors import DaunceError
from daunce_core.storage import validate
from daunce_core.storage.digest import digest_json, digest_path
from daunce_core.storage.layout import RunLayout, Workspace, manifest_of, remove_partials
from daunce_core.storage.lineage import Lineage
from daunce_core.storage.manifest import (
    manifest_intact,
    portable,
    read_manifest,
    write_manifest,
)
from daunce_core.storage.records import CopyRecords
from daunce_core.storage.reflections import RunReflections
from daunce_core.storage.zarr_store import RunStore
from flows.config import RunConfig
from flows.fanout import groups_of, map_groups
from flows.lock import workspace_lock
from tasks.common import copy_access
from tasks.copies import prepare_reflections, reflect_copies, train_copies
from tasks.data import prepare_data
from tasks.model import base_model, base_quality, base_signals
from tasks.scoring import compute_scores, export_tables


def code_version() -> str:
    """The git commit of the code, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def claim_run_dir(run_dir: Path, config: RunConfig, overwrite: bool) -> None:
    """Refuse to reuse ``run_dir`` for a different configuration unless ``overwrite``."""
    marker = RunLayout(run_dir).identity
    identity = config.identity()
    if _held_identity(marker) not in (None, identity):
        if not overwrite:
            raise DaunceError(
                f"the run folder {run_dir} holds a run with a different configuration; "
                "use another name or workspace, or pass --overwrite to replace it."
            )
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _held_identity(marker) is None:
        _write_atomic(marker, json.dumps({"identity": identity, "digest": config.digest()}))


def _held_identity(marker: Path) -> dict | None:
    """The identity a run folder's ``run.json`` holds; None if it is missing or damaged.

    A damaged one is written again: the folder's name is the digest of its identity.
    """
    try:
        return json.loads(marker.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _task_runner(config: RunConfig):
    execution = config.execution
    if execution.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if execution.dask_address:
            return DaskTaskRunner(address=execution.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": execution.workers,
                "threads_per_worker": 1,
                "processes": True,
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=execution.workers)


def _call(
    records: dict, states: list, name: str, task, *args, artefact: Path, root: Path, **how
) -> Any:
    """Run ``task`` unless its artefact is done for these inputs; keep its record as ``name``.

    ``how`` (keyword arguments of the task that say how to compute, such as the device) are
    passed on but are not part of the artefact's key. ``root`` is the workspace: paths inside
    it enter the key, and the manifest, relative to it, so a copied or moved workspace is
    served from its own artefacts.

    The artefact's manifest (`daunce_core.storage.manifest`, beside ``artefact``) is its one
    done signal: its inputs' digest and the content digest of every file the record names. A
    deleted, damaged or overwritten artefact, or one made from other inputs, is computed again.
    """
    started = time.perf_counter()
    key = _cache_key(task.name, portable(args, root))
    manifest = manifest_of(artefact)
    record, status = read_manifest(manifest, key, root), "Cached"
    if record is None:
        record, status = task(*args, **how), "Completed"
        write_manifest(manifest, key, record, root)
    records[name] = record
    states.append(
        {
            "task": task.name,
            "status": status,
            "key": name,
            "cache_key": key,
            "seconds": time.perf_counter() - started,
        }
    )
    return record


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _cache_key(name: str, inputs) -> str:
    """Digest of a task's name and inputs: its artefact's key (manifest and lineage).

    An input that is another step's record (``uri`` and ``digest``) enters by its digest: the
    same content read from elsewhere (a moved file, a copied workspace) gives the same key.
    """
    return digest_json({"task": name, "inputs": _content_of(inputs)})


def _content_of(value):
    if isinstance(value, dict):
        if "uri" in value and "digest" in value:
            return value["digest"]
        return {k: _content_of(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_content_of(v) for v in value]
    return value


def _prepare(config: RunConfig, layout: Workspace, records: dict, states: list) -> None:
    """Both splits in canonical form, in folders named by their sources and content."""
    splits = {"train": [config.data.train], "queries": config.data.query_sources()}
    columns = validate.task_columns(config.task)
    text = sorted({columns[name] for name in validate.TEXT_FIELDS if name in columns})
    for split, sources in splits.items():
        sources = [to_dict(source) for source in sources]
        content = digest_json([digest_path(source["path"]) for source in sources])
        # Named by content and how it is read, not where the file is: a moved file is reused.
        how = [{k: v for k, v in source.items() if k != "path"} for source in sources]
        named = {"sources": how, "content": content} | ({"text": text} if text else {})
        folder = layout.data(digest_json(named))
        _call(
            records,
            states,
            split,
            prepare_data,
            sources,
            split,
            str(folder),
            content,
            text,
            artefact=folder,
            root=layout.root,
        )


def _model(config: RunConfig, layout: Workspace, records: dict, states: list) -> None:
    """The base model, in a folder named by its recipe, its training data and checkpoint."""
    checkpoint = config.model.checkpoint
    checkpoint_digest = digest_path(checkpoint) if checkpoint else None
    key = digest_json(
        {
            "model": to_dict(config.model),
            "task": config.task,
            "train": records["train"]["digest"],
            "checkpoint": checkpoint_digest,
        }
    )
    path = layout.base_model(key)
    _call(
        records,
        states,
        "model",
        base_model,
        to_dict(config.model),
        config.task,
        records["train"],
        str(path),
        checkpoint_digest,
        artefact=path,
        root=layout.root,
    )


def _signals(config: RunConfig, layout: Workspace, records: dict, states: list) -> None:
    """The base signals, keyed by only what they depend on (not the copies' settings)."""
    objective = config.daunce.objective
    spec = {
        "variant": objective.variant,
        "dtype": config.daunce.dtype,
    }
    key = digest_json(
        {
            "model": records["model"]["digest"],
            "task": config.task,
            "train": records["train"]["digest"],
            "margin": objective.uses_margin,
            "dtype": config.daunce.dtype,
        }
    )
    path = layout.signals(key)
    _call(
        records,
        states,
        "signals",
        base_signals,
        to_dict(config.model),
        config.task,
        spec,
        records["model"],
        records["train"],
        str(path),
        artefact=path,
        root=layout.root,
        batch_size=config.compute.eval_batch_size,
    )


def _quality(config: RunConfig, layout: Workspace, records: dict, states: list) -> None:
    """How well the base model fits (loss, accuracy on both splits), beside the base model."""
    key = digest_json(
        {
            "model": records["model"]["digest"],
            "task": config.task,
            "train": records["train"]["digest"],
            "queries": records["queries"]["digest"],
        }
    )
    path = Path(records["model"]["uri"]).parent / f"quality-{key[:16]}.parquet"
    _call(
        records,
        states,
        "quality",
        base_quality,
        to_dict(config.model),
        config.task,
        records["model"],
        records["train"],
        records["queries"],
        str(path),
        artefact=path,
        root=layout.root,
        batch_size=config.compute.eval_batch_size,
    )


def _inputs(config: RunConfig, layout: Workspace, states: list) -> dict:
    """Prepare the data, the base model, its quality and signals (content-addressed)."""
    records: dict = {}
    _prepare(config, layout, records, states)
    _model(config, layout, records, states)
    _quality(config, layout, records, states)
    # A language model's base signals are recomputed per batch from cached hidden states.
    if config.daunce.objective.needs_base_signals and config.model.access == "torch":
        _signals(config, layout, records, states)
    return records


def _copy_spec(config: RunConfig, records: dict) -> dict:
    """Everything the copies depend on (paths and digests), minus K, and how to compute them."""
    daunce = to_dict(config.daunce)
    daunce.pop("num_models")

    def pick(record: dict) -> dict:
        return {"uri": record["uri"], "digest": record["digest"]}

    spec = {
        "kind": config.model.access,
        "daunce": daunce,
        "compute": to_dict(config.compute),
        "recipe": config.model.recipe,
        "task": config.task,
        "l2": config.model.l2,
        "train": pick(records["train"]),
        "queries": pick(records["queries"]),
        "model": pick(records["model"]),
        "signals": pick(records["signals"]) if "signals" in records else None,
    }
    if config.model.access == "api":
        spec["label"] = _api_label(config)  # names each copy's jobs on the server
    return spec


def _api_label(config: RunConfig) -> str:
    """What names an API run's jobs: the run's name and what decides its copies, no more.

    How losses are read (``loss``, ``end_text``) and scored (``score``) are left out, so a
    run that changes only those finds (and adopts) the jobs it already paid for. At most
    37 characters, so that ``<label>-k<k>-a<attempt>`` fits the 64 of a job suffix.
    """
    plain = config.identity()
    plain["daunce"].pop("score", None)
    recipe = dict(plain["model"]["recipe"])
    for name in ("loss", "end_text"):
        recipe.pop(name, None)
    plain["model"]["recipe"] = recipe
    return f"{config.name[:24]}-{digest_json(plain)[:12]}"


def _span(group: list) -> str:
    return f"{group[0]}-{group[-1]}" if len(group) > 1 else f"{group[0]}"


def _run_copies(config: RunConfig, run_dir: Path, spec: dict, query_digests: list) -> list[dict]:
    """Bring every copy to done, in groups mapped over the task runner, reporting progress.

    The groups' tasks are not cached by Prefect: each copy's record is its done signal, so a
    group of finished copies costs a few reads, and a group with one unfinished copy trains
    that copy alone.
    """
    total = config.daunce.num_models
    records = CopyRecords(RunLayout(run_dir).copies)
    unfinished = [k for k in range(total) if not _finished(records, k)]
    finished = [k for k in range(total) if k not in set(unfinished)]
    print(f"{len(finished)} of {total} copies already done")
    # Finished copies are still checked (row digests, new queries), in larger groups.
    groups = groups_of(unfinished, config.compute.group_size) + groups_of(finished, 256)
    task = train_copies.with_options(retries=config.execution.retries)
    shared = {"run_dir": str(run_dir), "spec": spec, "query_digests": query_digests}
    workspace = RunLayout(run_dir).workspace.root
    mapped = map_groups(task, groups, "copies", 0, total, **shared)
    return [
        result
        | {"state": state if _worked(result) else "Cached"}
        | {"cache_key": _cache_key("train-copies", portable([group, spec], workspace))}
        for group, result, state in mapped
    ]


def _run_reflections(
    config: RunConfig, run_dir: Path, spec: dict, query_digests: list, n: int, m: int
) -> list[tuple[dict, dict]]:
    """Measure every finished copy's reflection ``θ0 − Δ_k`` (``score: subspace``), in groups.

    (For an API run: the one-sided stand-ins and the factors on curvature probes, which are
    sampled first, once.)

    The arrays are made here, once, before the groups' tasks write their rows; each copy's
    marker (`daunce_core.storage.reflections`) says whether it is measured already. Returns each
    group's state and its task's report (which copies it measured, and retrained because their
    parameter files were lost).
    """
    total = config.daunce.num_models
    access = copy_access(spec)
    if not hasattr(access, "changes_shape"):
        raise DaunceError(
            f"score: subspace needs copies that can be reflected and measured in process; "
            f"model.access {config.model.access!r} cannot. Use score: covariance or correlation."
        )
    store = RunStore(RunLayout(run_dir).store)
    store.ensure_reflections(total, n, m, access.changes_shape(), config.daunce.dtype)
    groups = groups_of(list(range(total)), config.compute.group_size)
    task = reflect_copies.with_options(retries=config.execution.retries)
    shared = {"run_dir": str(run_dir), "spec": spec, "query_digests": query_digests}
    if config.model.access in REMOTE_KINDS:  # curvature probes, sampled once for all groups
        prepare_reflections.with_options(retries=config.execution.retries)(**shared)
    mapped = map_groups(task, groups, "reflections", 0, total, **shared)
    return [
        (
            {
                "task": "reflect-copies",
                "key": _span(group),
                "status": state if result["measured"] else "Cached",
                "cache_key": None,
                "seconds": result["seconds"],
            },
            result,
        )
        for group, result, state in mapped
    ]


def _worked(report: dict) -> bool:
    """Whether a copy task trained or measured anything (else it was served from disk)."""
    return any(report[key] for key in ("trained", "remeasured", "queries_added_to"))


def _finished(records: CopyRecords, k: int) -> bool:
    try:
        return records.read(k).finished
    except DaunceError:
        return False


@flow(name="attribute", log_prints=True)
def attribute_flow(config: dict, overwrite: bool = False) -> dict:
    """Attribute the queries of ``config`` (a `RunConfig` as a dict) to its training data."""
    run = from_dict(RunConfig, config, "")
    with workspace_lock(Path(run.workspace)):
        return _locked_attribute(run, overwrite)


def _locked_attribute(run: RunConfig, overwrite: bool) -> dict:
    workspace = Path(run.workspace)
    run_dir = Workspace(workspace).run(run.run_id()).root
    claim_run_dir(run_dir, run, overwrite)
    lineage = Lineage(Workspace(workspace).lineage)
    lineage.start_run(
        run.run_id(),
        run.name,
        to_dict(run),
        run.digest(),
        code_version=code_version(),
        num_models=run.daunce.num_models,
        run_dir=str(run_dir.relative_to(workspace)),
    )
    started = time.perf_counter()
    try:
        summary = _attribute(run, run_dir, workspace, lineage)
    except BaseException as error:
        status, message = _failure(run_dir, error)
        seconds = time.perf_counter() - started
        lineage.finish_run(run.run_id(), status, seconds, message, computed=status == "failed")
        _record_copies(lineage, run, run_dir)  # a failed run's jobs and costs, as they stand
        raise
    # A rerun served entirely from the workspace keeps the timing of the run that computed.
    computed = any(state != "Cached" for state in summary["states"].values())
    lineage.finish_run(run.run_id(), "completed", time.perf_counter() - started, computed=computed)
    lineage.create_views(Workspace(workspace).runs)
    summary = summary | {"seconds": time.perf_counter() - started}
    RunLayout(run_dir).summary.write_text(json.dumps(summary, indent=1))
    return summary


def _failure(run_dir: Path, error: BaseException) -> tuple[str, str]:
    """The status a failed run leaves: ``completed`` if an earlier run's exports are intact."""
    layout = RunLayout(run_dir)
    if manifest_intact(manifest_of(layout.exports), layout.workspace.root):
        return "completed", (
            f"a rerun failed ({error!r}); the exports of the last completed run are intact "
            "and still served"
        )
    return "failed", repr(error)


def _remove_orphans(run_dir: Path, workspace: Path) -> list[str]:
    """Temporary files a killed process left in the run folder or the shared artefacts."""
    folders = (run_dir, *Workspace(workspace).scratch_folders())
    return [path for folder in folders for path in remove_partials(folder)]


def _copy_states(copies: list[dict]) -> list[dict]:
    return [
        {
            "task": "train-copies",
            "key": _span(c["ks"]),
            "status": c["state"],
            "cache_key": c["cache_key"],
            "seconds": c["seconds"],
        }
        for c in copies
    ]


def _outputs(run: RunConfig, run_dir: Path, records: dict, states: list, rows: str, spec: dict):
    """Scores, then the Parquet exports; return the exports' records."""
    scores = _call(
        records,
        states,
        "scores",
        compute_scores,
        str(run_dir),
        run.daunce.score,
        rows,
        run.daunce.num_models,
        artefact=RunLayout(run_dir).scores,
        root=RunLayout(run_dir).workspace.root,
        queries=records["queries"]["uri"],
        spec=spec,
    )
    splits = {"train": records["train"], "queries": records["queries"]}
    return _call(
        records,
        states,
        "exports",
        export_tables,
        str(run_dir),
        run.run_id(),
        scores,
        splits,
        run.exports.top_k,
        artefact=RunLayout(run_dir).exports,
        root=RunLayout(run_dir).workspace.root,
    )


def _record(lineage: Lineage, run_id: str, records: dict, exports: list, states: list) -> None:
    kinds = ("train", "queries", "model", "quality", "signals", "scores")
    artifacts = [records[k] for k in kinds if k in records] + exports
    tasks = [
        {
            "task": f"{s['task']}[{s['key']}]",
            "status": s["status"],
            "cache_key": s.get("cache_key"),
            "seconds": s["seconds"],
        }
        for s in states
    ]
    lineage.record(run_id, artifacts, tasks)


def _rows_digest(run: RunConfig, run_dir: Path, spec: dict, workspace: Path) -> str:
    """Digest of the loss rows the scores read: every copy's row digest and status."""
    records = CopyRecords(RunLayout(run_dir).copies).read_many(range(run.daunce.num_models))
    rows = [(r.status, r.rows_digest, r.queries_key) for r in records]
    spec = portable({k: v for k, v in spec.items() if k != "compute"}, workspace)
    if run.daunce.score != "subspace":
        return digest_json({"rows": rows, "spec": spec})
    markers = RunReflections.marker_digest_of(RunLayout(run_dir), run.daunce.num_models)
    return digest_json({"rows": rows, "spec": spec, "reflections": markers})


def _prompt_plan(run: RunConfig, n: int, m: int) -> str:
    """What each copy of a prompt run may spend: its search's bound, then its measurement."""
    recipe = parse_prompt_recipe(run.model.recipe)
    s, b = recipe.search, recipe.budget
    step = s.samples * s.batch_size
    calls = s.steps * step if b.calls is None else min(s.steps * step, b.calls // step * step)
    tokens = f", at most {b.tokens:,} prompt tokens" if b.tokens else ""
    return (
        f"each of {run.daunce.num_models} copies: a prompt search of at most {calls:,} loss "
        f"queries ({s.samples} prompts × {s.batch_size} examples per step){tokens}, then "
        f"{n + m:,} to measure it on {n:,} training examples and {m:,} queries"
    )


def _attribute(run: RunConfig, run_dir: Path, workspace: Path, lineage: Lineage) -> dict:
    layout, states = Workspace(workspace), []
    orphans = _remove_orphans(run_dir, workspace)
    records = _inputs(run, layout, states)
    if run.model.access in REMOTE_KINDS:
        base = json.loads(Path(records["model"]["uri"]).read_text())
        how = {"echo": "prompt log-probabilities (echo)", "top_logprobs": "top_logprobs"}
        print(f"{base['model']} at {base['base_url']}: losses read from {how[base['loss_method']]}")
    n, m = records["train"]["count"], records["queries"]["count"]
    if run.model.access == "prompt":
        print(_prompt_plan(run, n, m))
    store = RunStore(RunLayout(run_dir).store)
    store.ensure(run.daunce.num_models, n, m, run.daunce.dtype)
    spec = _copy_spec(run, records)
    identity = {k: v for k, v in spec.items() if k in IDENTITY_KEYS}
    identity["daunce"] = {k: v for k, v in spec["daunce"].items() if k != "score"}
    if run.model.access == "api":  # the limits and the key's variable name no copies
        identity["recipe"] = parse_api_recipe(run.model.recipe).identity_fields
    if run.model.access == "prompt":
        identity["recipe"] = parse_prompt_recipe(run.model.recipe).identity_fields
    earlier = (digest_json(portable(identity, workspace)), digest_json(identity))
    store.check_copies_key(digest_json(_content_of(identity)), legacy=earlier)
    index = pl.read_parquet(Path(records["queries"]["uri"]) / "index.parquet")
    copies = _run_copies(run, run_dir, spec, index["digest"].to_list())
    states += _copy_states(copies)
    restored: list[int] = []
    reflected: list[int] = []
    if run.daunce.score == "subspace":
        reflections = _run_reflections(run, run_dir, spec, index["digest"].to_list(), n, m)
        states += [state for state, _ in reflections]
        restored = sorted(k for _, result in reflections for k in result["retrained"])
        reflected = sorted(k for _, result in reflections for k in result["measured"])
    rows = _rows_digest(run, run_dir, spec, workspace)
    exports = _outputs(run, run_dir, records, states, rows, spec)
    _record(lineage, run.run_id(), records, exports, states)
    copy_records = _record_copies(lineage, run, run_dir)
    quality = records["quality"]
    lineage.record_metrics(
        run.run_id(), quality["metrics"], "base_model", {"predictions": quality["uri"]}
    )
    suffix = KINDS[run.model.access].copy_suffix
    return {
        "run_id": run.run_id(),
        "run_dir": str(run_dir),
        "num_train": n,
        "num_queries": m,
        "excluded": records["scores"]["excluded"],
        "orphans_removed": len(orphans),
        "trained_now": sum(len(c["trained"]) for c in copies) + len(restored),
        "retrained_lost": sorted({k for c in copies for k in c["retrained_lost"]} | {*restored}),
        "remeasured": sorted(k for c in copies for k in c["remeasured"]),
        "reflected_now": reflected,
        "params_missing": sorted(  # still missing now (reflections may have restored them)
            k
            for c in copies
            for k in c["params_missing"]
            if k not in restored and not RunLayout(run_dir).copy(k, suffix).exists()
        ),
        "reproducible": KINDS[run.model.access].capabilities.deterministic,
        "flow_process": os.getpid(),
        "copy_processes": sorted({c["process"] for c in copies if c["trained"]}),
        "states": {f"{s['task']}[{s['key']}]": s["status"] for s in states},
        "base_model": {"metrics": quality["metrics"], "predictions": quality["uri"]},
        "warnings": [w for w in (quality["warning"], records["scores"].get("constant")) if w],
        "usage": _usage(copy_records),
    }


def _record_copies(lineage: Lineage, run: RunConfig, run_dir: Path) -> list:
    """The copies' records (damaged ones left out), also written to the ``copies`` table."""
    records = []
    for k in range(run.daunce.num_models):
        try:
            records.append(CopyRecords(RunLayout(run_dir).copies).read(k))
        except DaunceError:
            continue
    try:
        lineage.record_copies(run.run_id(), records)
    except Exception as error:  # the lineage must not hide the run's own outcome
        print(f"warning: the copies' records did not reach the lineage ({error})")
    return records


def _usage(records: list) -> dict[str, int]:
    """What the copies cost, summed (requests, tokens, jobs: an API run's bill)."""
    total: dict[str, int] = {}
    for record in records:
        for name, value in (record.usage or {}).items():
            total[name] = total.get(name, 0) + value
    return total


IDENTITY_KEYS = ("kind", "daunce", "recipe", "task", "l2", "train", "model", "signals")
"""The copy spec's entries that determine the copies (not the queries, not how computed)."""


def run_attribute(config: RunConfig, overwrite: bool = False) -> dict:
    """Run `attribute_flow` for ``config`` on the task runner its execution settings name.

    Nothing is kept in Prefect's result storage: what is done lives in the workspace (copy
    records, artefact manifests), so a rerun from any process — CLI, worker, test, a copied
    workspace — finds it.
    """
    flow_with_runner = attribute_flow.with_options(task_runner=_task_runner(config))
    return flow_with_runner(to_dict(config), overwrite=overwrite)


@flow(name="attribute-from-file", log_prints=True)
def attribute_from_file(config_path: str, overwrite: bool = False) -> dict:
    """The attribute flow for a YAML configuration file (the form deployments use)."""
    from flows.config import load_config

    return run_attribute(load_config(config_path), overwrite=overwrite)

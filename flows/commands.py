"""What each ``daunce`` sub-command does (argument parsing is in `flows.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from daunce_core.errors import DaunceError
from daunce_core.storage.layout import Workspace
from daunce_core.storage.lineage import Lineage, query_frame
from flows.cli import prefect_environment
from flows.lock import workspace_lock


def _load(args, **overrides):
    from flows.config import load_config

    return load_config(args.config, workspace=getattr(args, "workspace", None), **overrides)


@contextmanager
def _running(config):
    """Hold the run's workspace (refusing a second run at once), then start Prefect."""
    with workspace_lock(Path(config.workspace)):
        prefect_environment(config.workspace)
        yield


def run(args) -> int:
    """``daunce run CONFIG``: the attribute flow; prints where the results are."""
    config = _load(args)
    with _running(config):
        from flows.attribute import run_attribute

        summary = run_attribute(config, overwrite=args.overwrite)
        _print_summary(summary)
        return 0


def extend(args) -> int:
    """``daunce extend CONFIG --num-models K'``: train only the new copies, rescore."""
    import dataclasses

    config = _load(args)
    if args.num_models < config.daunce.num_models:
        raise DaunceError(
            f"--num-models {args.num_models} is below the configured {config.daunce.num_models};"
            " extend only grows K."
        )
    daunce = dataclasses.replace(config.daunce, num_models=args.num_models)
    config = dataclasses.replace(config, daunce=daunce)
    with _running(config):
        from flows.attribute import run_attribute

        _print_summary(run_attribute(config))
        return 0


def add_queries(args) -> int:
    """``daunce add-queries CONFIG --queries PATH``: evaluate the stored copies on new queries."""
    import dataclasses

    from daunce_core.storage.sources import DataSource
    from flows.config import check_inputs

    config = _load(args)
    sources = [*config.data.query_sources(), DataSource(path=str(Path(args.queries).resolve()))]
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, queries=sources))
    check_inputs(config)  # the new query file too, before the server starts
    with _running(config):
        from flows.attribute import run_attribute

        _print_summary(run_attribute(config))
        print(
            f"to keep these queries in later runs, list {args.queries} under data.queries in "
            f"{args.config}."
        )
        return 0


def _evaluation_config(args, section: str):
    """The run configuration with the command line's evaluation options applied."""
    import dataclasses

    from flows.config import BaselineConfig, ScoreFile

    config = _load(args)
    evaluation = config.evaluation
    extra = [BaselineConfig(method=m) for m in args.baseline or []]
    files = []
    for item in args.scores or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DaunceError(f"--scores takes NAME=PATH; got {item!r}.")
        files.append(ScoreFile(name=name, path=str(Path(path).resolve())))
    changes = {
        key: value
        for key, value in (
            ("seeds", args.seeds),
            ("subsets", getattr(args, "subsets", None)),
            ("sizes", getattr(args, "sizes", None)),
        )
        if value is not None
    }
    evaluation = dataclasses.replace(
        evaluation,
        baselines=[*evaluation.baselines, *extra],
        scores=[*evaluation.scores, *files],
        **{section: dataclasses.replace(getattr(evaluation, section), **changes)},
    )
    return dataclasses.replace(config, evaluation=evaluation)


def lds(args) -> int:
    """``daunce lds CONFIG``: ground truth, then the LDS of every method; prints a table."""
    config = _evaluation_config(args, "lds")
    with _running(config):
        from flows.evaluate import run_lds

        summary = run_lds(config, overwrite=args.overwrite)
        m, s = summary["grid"]
        print(f"\nLDS ({summary['outcome']}) of run {summary['run_id']}, {m} subsets × {s} seeds:")
        for name, r in sorted(summary["results"].items(), key=lambda kv: -kv[1]["mean"]):
            print(f"  {name:<24} {r['mean']:.3f} ± {r['stderr']:.3f}")
        print("per query: SELECT * FROM lds_per_query; all runs: SELECT * FROM lds_results")
        return 0


def removal(args) -> int:
    """``daunce removal CONFIG``: the subset-removal test of every method; prints a table."""
    config = _evaluation_config(args, "removal")
    with _running(config):
        from flows.evaluate import run_removal

        summary = run_removal(config, overwrite=args.overwrite)
        print(f"\nsubset removal, run {summary['run_id']}: fraction of queries flipped")
        import polars as pl

        with pl.Config(tbl_rows=100):
            print(pl.DataFrame(summary["table"]))
        print("all runs: SELECT * FROM removal_results")
        return 0


def _print_summary(summary: dict) -> None:
    print(
        f"run {summary['run_id']}: {summary['num_train']} train × {summary['num_queries']} "
        f"queries, {summary['trained_now']} copies trained now, {summary['seconds']:.1f}s"
    )
    if summary["excluded"]:
        print(f"copies left out (diverged): {summary['excluded']}")
    if summary.get("retrained_lost"):
        print(
            f"copies {summary['retrained_lost']}: their saved parameters were lost or damaged; "
            "trained again from their seeds (this model access is deterministic)"
        )
    if summary.get("params_missing"):
        missing, later = summary["params_missing"], "are trained again from their seeds"
        if not summary.get("reproducible", True):
            later = (
                "are found again from their recorded fine-tuning jobs when needed (a copy "
                "without a recorded job cannot be: restore its file before adding queries)"
            )
        print(
            f"daunce: warning: copies {missing} have no saved parameters (their loss rows are "
            f"intact); they are needed only to measure new queries, and {later}",
            file=sys.stderr,
        )
    if summary.get("reflected_now"):
        ks = summary["reflected_now"]
        shown = ks if len(ks) <= 8 else f"[{ks[0]} … {ks[-1]}]"
        print(f"copies {shown}: reflections measured now ({len(ks)}; score: subspace)")
    if summary.get("remeasured"):
        print(
            f"copies {summary['remeasured']}: their loss rows were missing or damaged; measured "
            "again from their saved parameters"
        )
    print(f"results: {summary['run_dir']}")
    if summary.get("base_model"):
        print(f"base model: {_base_model_text(summary['base_model']['metrics'])}")
    for warning in summary.get("warnings", []):
        print(f"daunce: warning: {warning}", file=sys.stderr)


def _base_model_text(metrics: dict) -> str:
    """``train accuracy 97.1% (loss 0.12), queries 93.3% (loss 0.25); majority label 10.4%``."""
    parts = []
    for split, name in (("train", "train"), ("query", "queries")):
        loss = f"loss {metrics[f'base/{split}_loss']:.4g}"
        accuracy = metrics.get(f"base/{split}_accuracy")
        parts.append(f"{name} {loss}" if accuracy is None else f"{name} {accuracy:.1%} ({loss})")
    text = (
        "accuracy on " + ", ".join(parts) if "base/train_accuracy" in metrics else ", ".join(parts)
    )
    if "base/majority_rate" in metrics:
        text += f"; the most frequent training label alone: {metrics['base/majority_rate']:.1%}"
    return text


def _lineage(workspace: str, must_exist: bool = True) -> Lineage:
    path = Workspace(workspace).lineage
    if must_exist and not path.exists():
        raise DaunceError(
            f"no runs in workspace {workspace!r} (no {path}); run `daunce run CONFIG` first or "
            "pass --workspace."
        )
    return Lineage(path)


def _exports_root(lineage: Lineage) -> Path:
    """The folder whose runs' Parquet exports the views read: ``<workspace>/runs``."""
    return Workspace(lineage.path.parent).runs


def _latest_run(lineage: Lineage, completed: bool) -> str:
    where = "WHERE status = 'completed'" if completed else ""
    with lineage.connect(read_only=True) as con:
        row = con.execute(f"SELECT run_id FROM runs {where} ORDER BY started_at DESC").fetchone()
    if row is None:
        raise DaunceError("no completed run in this workspace yet.")
    return row[0]


def runs(args) -> int:
    """``daunce runs``: one line per run.

    ``seconds`` is the time of the last run that computed something; ``last_checked_at`` the
    end of the last run, one served from the workspace included.
    """
    lineage = _lineage(args.workspace)
    with lineage.connect(read_only=True) as con:  # a database no run of this version wrote
        columns = {row[0] for row in con.execute("DESCRIBE runs").fetchall()}
    checked = ", last_checked_at" if "last_checked_at" in columns else ""
    return _print_query(
        lineage,
        "SELECT run_id, status, num_models, started_at, round(seconds, 1) AS seconds"
        f"{checked} FROM runs ORDER BY started_at DESC",
        "table",
    )


def _workspace_busy(workspace: str) -> bool:
    """Whether a process holds the workspace's run lock now."""
    import fcntl

    lock = Workspace(workspace).lock
    if not lock.exists():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def status(args) -> int:
    """``daunce status``: a run's state, its copies done / diverged / pending, its artefacts.

    The run's folder is found in the workspace (``runs/<run_id>``), wherever the workspace was
    when the run was recorded: a copied or moved workspace reports its own copies.
    """
    from daunce_core.storage.records import CopyRecords

    lineage = _lineage(args.workspace)
    run_id = args.run or _latest_run(lineage, completed=False)
    with lineage.connect(read_only=True) as con:
        row = con.execute(
            "SELECT status, num_models, seconds, message FROM runs WHERE run_id = ?",
            [run_id],
        ).fetchone()
    if row is None:
        raise DaunceError(f"no run {run_id!r} in this workspace; see `daunce runs`.")
    state, num_models, seconds, message = row
    if state == "running" and not _workspace_busy(args.workspace):
        state = "interrupted (no process is running it; run the same command again to resume)"
    print(f"run {run_id}: {state}" + (f" in {seconds:.1f}s" if seconds else ""))
    counts = CopyRecords(Workspace(args.workspace).run(run_id).copies).counts(num_models or 0)
    pending = counts.get("pending", 0) + counts.get("training", 0)
    damaged = f", {counts['damaged']} with a damaged record" if counts.get("damaged") else ""
    print(
        f"copies: {counts.get('done', 0)} done, {counts.get('diverged', 0)} diverged, "
        f"{pending} pending{damaged} of {num_models}"
    )
    _print_jobs(CopyRecords(Workspace(args.workspace).run(run_id).copies), num_models or 0)
    if message:
        print(f"message: {message}")
    return 0


def _print_jobs(records, num_models: int) -> None:
    """A remote run's copies: each one's job (API) or search (prompt), and what they cost."""
    rows, usage, jobs, fits = [], {}, False, []
    for k in range(num_models):
        try:
            record = records.read(k)
        except DaunceError:
            continue
        if record.training:
            fits.append(record.training)
        for name, value in (record.usage or {}).items():
            usage[name] = usage.get(name, 0) + value
        if record.job_id:
            jobs = True
            attempts = f" (attempt {len(record.jobs)})" if len(record.jobs) > 1 else ""
            rows.append(
                f"  copy {k:>4}  {record.status:<8}  job {record.job_id}{attempts}: "
                f"{record.job_state or 'unknown'}"
            )
        elif record.job_state:  # a prompt search's progress
            rows.append(f"  copy {k:>4}  {record.status:<8}  {record.job_state}")
    _print_training(fits)
    if not rows:
        return
    print("fine-tuning jobs:" if jobs else "prompt searches:")
    print("\n".join(rows))
    spent = {name: value for name, value in sorted(usage.items()) if value}
    if spent:
        print("usage: " + ", ".join(f"{name} {value:,}" for name, value in spent.items()))


def _print_training(fits: list[dict]) -> None:
    """In-process copies: the learning rate they used and how many converged."""
    if not fits:
        return
    rates = sorted({f["lr"] for f in fits if f.get("lr") is not None})
    line = "copies' learning rate: " + ", ".join(f"{rate:.4g}" for rate in rates)
    judged = [f for f in fits if f.get("converged") is not None]
    if judged:
        done = sum(f["converged"] for f in judged)
        residuals = sorted(f["residual"] for f in judged if f.get("residual") is not None)
        median = f", median residual {residuals[len(residuals) // 2]:.3g}" if residuals else ""
        line += f"; converged: {done} of {len(judged)}{median}"
    print(line)


TOP_SQL = (
    "SELECT t.rank, t.train_id, t.score, e.* EXCLUDE (run_id, split, example_id, digest) "
    "FROM {table} t LEFT JOIN run_examples($1) e ON e.split = 'train' AND "
    "e.example_id = t.train_id WHERE t.run_id = $1 AND t.method = $2 AND t.query_id = $3 AND "
    "t.rank <= $4 ORDER BY t.rank"
)
"""A query's top-k rows of ``{table}`` (proponents or opponents) with the run's own example
columns (`daunce_core.storage.lineage.RUN_EXAMPLES`: its labels, not other runs' columns)."""

FLAT = "(score = 0 OR NOT isfinite(score))"
"""SQL: a score that ranks nothing (zero, or infinite / NaN)."""


def top(args) -> int:
    """``daunce top --query ID``: the best (or worst) training examples for one query.

    Rows whose score is zero or not finite are left out (their order would be the training
    index order, not a ranking); a query all of whose scores are so is said to have no ranking.
    A ``-k`` above what the run exported is noted on stderr, naming ``exports.top_k``.
    """
    if args.k < 1:
        raise DaunceError(f"-k must be at least 1; got {args.k}.")
    lineage = _lineage(args.workspace)
    run_id = args.run or _latest_run(lineage, completed=True)
    table = "top_opponents" if args.opponents else "top_proponents"
    with _top_connection(lineage) as con:
        found = con.execute(
            f"SELECT count(*) FROM {table} WHERE run_id = ? AND method = ? AND query_id = ?",
            [run_id, args.method, args.query],
        ).fetchall()[0][0]
        if not found:  # before the join: a run that does not exist has no examples to read
            _no_rows(con, table, run_id, args)
        frame = query_frame(
            con, TOP_SQL.format(table=table), [run_id, args.method, args.query, args.k]
        )
        limit = _export_limit(con, table, run_id, args) if frame.height < args.k else None
        ranked = frame.filter(frame["score"].is_finite() & (frame["score"] != 0))
        flat_query = ranked.height == 0 and _all_flat(con, run_id, args)
    return _print_top(frame, ranked, flat_query, limit, run_id, args)


@contextmanager
def _top_connection(lineage: Lineage):
    """A confined connection; a workspace without top-k exports becomes a `DaunceError`."""
    import duckdb

    try:
        with lineage.query_connection(_exports_root(lineage)) as con:
            yield con
    except (duckdb.CatalogException, duckdb.PermissionException) as error:
        raise DaunceError(
            f"this workspace has no top-k exports on disk ({error}); run `daunce run <config>` "
            "first."
        ) from error


def _no_rows(con, table: str, run_id: str, args) -> None:
    """Raise the `DaunceError` that says why a query has no top-k rows.

    The run has no exports at all; or none of ``args.method`` (a baseline not scored yet: the
    methods it has, and how to score this one); or none for this query id (the ids it has).
    """
    methods = [
        row[0]
        for row in con.execute(
            f"SELECT DISTINCT method FROM {table} WHERE run_id = ? ORDER BY method", [run_id]
        ).fetchall()
    ]
    if not methods:
        raise DaunceError(
            f"run {run_id} has no top-k exports; see `daunce runs` for the completed runs."
        )
    if args.method not in methods:
        raise DaunceError(_missing_method(args.method, methods, run_id, args.query))
    low, high = con.execute(
        f"SELECT min(query_id), max(query_id) FROM {table} WHERE run_id = ? AND method = ?",
        [run_id, args.method],
    ).fetchone()
    raise DaunceError(
        f"query id {args.query} has no {args.method} scores in run {run_id} (its {args.method} "
        f"query ids are {low}..{high}); pick one of those."
    )


def _missing_method(method: str, methods: list[str], run_id: str, query: int) -> str:
    """Why a run has no scores of ``method``, which methods it has, and how to get them."""
    from daunce_core.baselines.methods import BASELINES

    have = f"run {run_id} has no {method} scores (methods scored in it: {', '.join(methods)})"
    if method.partition("-")[0] not in BASELINES:  # a baseline with options: method-<digest>
        return (
            f"{have}, and daunce knows no method {method!r}: the baselines are "
            f"{', '.join(BASELINES)}; DAUNCE's own scores are --method daunce."
        )
    return (
        f"{have}. Baselines are scored by the evaluation commands: add {method} to "
        f"evaluation.baselines in the run's configuration and run `daunce lds CONFIG` (or "
        f"`daunce removal CONFIG`), or score it once with `daunce lds CONFIG --baseline {method}`;"
        f" then `daunce top --query {query} --method {method}`."
    )


def _export_limit(con, table: str, run_id: str, args) -> tuple[int, object] | None:
    """``(rows exported per query, exports.top_k of the run's configuration)`` if below -k."""
    exported = con.execute(
        f"SELECT max(rank) FROM {table} WHERE run_id = ? AND method = ?", [run_id, args.method]
    ).fetchone()[0]
    if exported is None or exported >= args.k:
        return None
    row = con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchone()
    try:
        configured = json.loads(row[0])["exports"]["top_k"]
    except (TypeError, KeyError, ValueError):
        configured = None
    return exported, configured


def _all_flat(con, run_id: str, args) -> bool:
    """Whether every exported score of the query, proponents and opponents, is flat."""
    row = con.execute(
        f"SELECT bool_and({FLAT}) FROM (SELECT score FROM top_proponents WHERE run_id = $1 AND "
        f"method = $2 AND query_id = $3 UNION ALL SELECT score FROM top_opponents WHERE "
        f"run_id = $1 AND method = $2 AND query_id = $3)",
        [run_id, args.method, args.query],
    ).fetchone()
    return bool(row[0])


def _print_top(frame, ranked, flat_query: bool, limit, run_id: str, args) -> int:
    """Print the ranked rows (or why there are none) and the notes about what was left out."""
    name = "opponents" if args.opponents else "proponents"
    if ranked.height == 0:
        print(_no_ranking(flat_query, run_id, args))
        return 0
    print(f"{name} of query {args.query} by {args.method} ({run_id})")
    _show(ranked)
    if ranked.height < frame.height:
        _note(
            f"{frame.height - ranked.height} of the top {frame.height} have score 0 (or not "
            "finite) and are left out: tied scores have no order but the training index."
        )
    if limit is not None:
        _note(_limit_text(limit, name, run_id, args))
    return 0


def _no_ranking(flat_query: bool, run_id: str, args) -> str:
    """Why query ``args.query`` has no ranking to show."""
    if not flat_query:
        sign, other = ("negative", "proponents") if args.opponents else ("positive", "opponents")
        flag = "" if args.opponents else " --opponents"
        return (
            f"no training example has a {sign} {args.method} score for query {args.query} in "
            f"run {run_id} (the top ones score 0, tied, in training index order); see its "
            f"{other}: daunce top --query {args.query}{flag}"
        )
    why = (
        "its loss does not vary across the perturbed copies"
        if args.method == "daunce"
        else f"{args.method} gives every training example the same score"
    )
    return (
        f"query {args.query} has no ranking in run {run_id}: its {args.method} scores do not "
        f"vary across copies (all are 0 or not finite) — {why}, so no training example ranks "
        "above another. See `daunce status` for diverged copies; a query the base model fits "
        "exactly has no loss to vary."
    )


def _limit_text(limit: tuple[int, object], name: str, run_id: str, args) -> str:
    """The note for a ``-k`` above the number of rows the run exported per query."""
    exported, configured = limit
    if isinstance(configured, int) and exported < configured:
        return f"run {run_id} ranks only {exported} training examples (all it has)."
    return (
        f"run {run_id} exported only the top {exported} {name} per query "
        f"(exports.top_k = {configured if configured is not None else exported}); to list "
        f"{args.k}, set exports.top_k: {args.k} (or more) in the run's configuration and rerun "
        "the command that made them (`daunce run CONFIG`; `daunce lds` or `daunce removal` for "
        "a baseline) — only the exports are recomputed."
    )


def _note(text: str) -> None:
    """A note on stderr, apart from the table on stdout."""
    print(f"daunce: note: {text}", file=sys.stderr)


def _show(frame) -> None:
    """Print a table with its floats to 4 significant digits, however small.

    Scores often are small (a covariance of losses is ~1e-5 on the demo), and polars' default
    display cuts every float to 6 decimals.
    """
    import polars as pl

    floats = [name for name, dtype in frame.schema.items() if dtype.is_float()]
    with pl.Config(tbl_rows=50, tbl_cols=20, fmt_float="full"):
        print(frame.with_columns(pl.col(floats).cast(pl.Float64).round_sig_figs(4)))


def sql(args) -> int:
    """``daunce sql "SELECT ..."``: one read-only query; table, CSV or JSON out.

    The query runs confined (see `Lineage.query`): a single SELECT over the lineage tables and
    the views over the workspace's Parquet exports, with no other file or network access.
    """
    return _print_query(_lineage(args.workspace), args.query, args.format)


def _print_query(lineage: Lineage, query: str, fmt: str) -> int:
    """Run ``query`` confined to ``lineage`` and its workspace's exports; print it as ``fmt``."""
    import duckdb

    try:
        frame = lineage.query(query, _exports_root(lineage))
    except duckdb.PermissionException as error:
        raise DaunceError(
            f"the query failed: {error}. daunce sql reads only the lineage tables and the views "
            "over this workspace's Parquet exports (or those files themselves)."
        ) from error
    except duckdb.Error as error:
        raise DaunceError(f"the query failed: {error}") from error
    if fmt == "csv":
        nested = [n for n, t in frame.schema.items() if t.is_nested()]
        if nested:
            raise DaunceError(
                f"CSV cannot hold the nested values of column(s) {nested}; use --format json, "
                "or select scalar columns (e.g. CAST(... AS VARCHAR))."
            )
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(frame.write_json() + "\n")
    else:
        _show(frame)
    return 0


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "data" / "digits.yaml"
DEMO_SQL = (
    "SELECT t.rank, t.train_id, t.score, e.y AS train_label "
    "FROM top_proponents t JOIN run_examples(?) e ON e.split = 'train' "
    "AND e.example_id = t.train_id WHERE t.run_id = ? AND t.method = 'daunce' AND t.query_id = 17 "
    "ORDER BY t.rank LIMIT 5"
)


def demo_config(workspace: str | None = None):
    """The demo's run configuration: `DEMO_CONFIG` in ``workspace``.

    The workspace is ``--workspace``, else ``./daunce-runs`` (``$DAUNCE_WORKSPACE``) in the
    current folder — where ``daunce top`` and ``daunce sql`` look by default — never a folder
    of the checkout that holds the configuration.
    """
    from flows.config import default_workspace, load_config

    return load_config(DEMO_CONFIG, workspace=workspace or default_workspace())


def demo(args) -> int:
    """``daunce demo``: the attribute flow on the embedded digits data, then a few answers."""
    config = demo_config(args.workspace)
    with _running(config):
        from flows.attribute import run_attribute

        summary = run_attribute(config)
        _print_summary(summary)
        for query in range(args.queries):
            print()
            top(
                argparse.Namespace(
                    query=query,
                    k=5,
                    opponents=False,
                    method="daunce",
                    run=summary["run_id"],
                    workspace=config.workspace,
                )
            )
        query = DEMO_SQL.replace("?", f"'{summary['run_id']}'")
        print(f'\n$ daunce sql "{query}"')
        _print_query(_lineage(config.workspace), query, "table")
        return 0

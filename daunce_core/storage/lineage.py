"""Lineage of runs in one DuckDB file: runs, parameters, artefacts, edges, task runs, evaluations.

One writer process (the flow's) writes this file; it opens the database for each write and
closes it at once, so that read-only readers (``daunce sql``) are locked out only for moments —
DuckDB lets no other process open a file that one process holds open. A connection that finds the
file locked retries with backoff for ``Lineage.lock_timeout`` seconds (``LOCK_TIMEOUT``, or the
``DAUNCE_LINEAGE_LOCK_TIMEOUT`` environment variable). Users' results (top-k tables, aggregates)
live in Parquet files; views over them make ``SELECT * FROM top_proponents WHERE query_id = 17``
work in this database. Users' own SQL runs through `Lineage.query`: one read-only query, confined
to this database and those Parquet files.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from daunce_core.errors import DaunceError
from daunce_core.storage.layout import VIEW_GLOBS

USAGE_COLUMNS = (
    "requests",
    "retries",
    "prompt_tokens",
    "completion_tokens",
    "trained_tokens",
    "jobs",
    "adopted",
    "search_calls",
    "search_tokens",
)
"""What a copy cost, in its record's ``usage`` (API and prompt access) and the ``copies`` table
(where ``jobs`` is the column ``jobs_created`` and ``adopted`` ``jobs_adopted``; ``jobs`` there
lists the job ids; ``search_calls`` and ``search_tokens`` are what a prompt search spent of its
budget)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, name VARCHAR, config_digest VARCHAR, config JSON,
    code_version VARCHAR, status VARCHAR, num_models INTEGER, num_train INTEGER,
    num_queries INTEGER, started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE,
    run_dir VARCHAR, message VARCHAR);
CREATE TABLE IF NOT EXISTS params (run_id VARCHAR, key VARCHAR, value VARCHAR);
CREATE TABLE IF NOT EXISTS copies (
    run_id VARCHAR, k INTEGER, status VARCHAR, attempts INTEGER, seconds DOUBLE,
    job_id VARCHAR, job_state VARCHAR, jobs JSON, requests BIGINT, retries BIGINT,
    prompt_tokens BIGINT, completion_tokens BIGINT, trained_tokens BIGINT);
ALTER TABLE copies ADD COLUMN IF NOT EXISTS jobs_created BIGINT;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS jobs_adopted BIGINT;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS search_calls BIGINT;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS search_tokens BIGINT;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS lr DOUBLE;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS steps BIGINT;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS residual DOUBLE;
ALTER TABLE copies ADD COLUMN IF NOT EXISTS converged BOOLEAN;
CREATE TABLE IF NOT EXISTS artifacts (
    run_id VARCHAR, uri VARCHAR, kind VARCHAR, digest VARCHAR, shape VARCHAR,
    producer VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS edges (run_id VARCHAR, input_uri VARCHAR, output_uri VARCHAR);
CREATE TABLE IF NOT EXISTS task_runs (
    run_id VARCHAR, flow_run_id VARCHAR, task VARCHAR, cache_key VARCHAR, status VARCHAR,
    seconds DOUBLE, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS evaluations (
    run_id VARCHAR, metric VARCHAR, value DOUBLE, details JSON, created_at TIMESTAMP);
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS method VARCHAR;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS stderr DOUBLE;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS last_checked_at TIMESTAMP;
"""

VIEWS = VIEW_GLOBS
"""The views over Parquet files below ``<workspace>/runs`` (`daunce_core.storage.layout`)."""

VIEW_COLUMNS = {"examples": ("run_id", "split", "example_id", "digest")}
"""Views that keep only the columns every run's files have: a run's own scalar columns (labels,
text, ...) would show as NULL columns in every other run's rows. A run's whole example index is
``run_examples('<run_id>')`` (`RUN_EXAMPLES`)."""

RUN_EXAMPLES = (
    "MACRO run_examples(run) AS TABLE SELECT * FROM "
    "read_parquet({root} || '/' || run || '/exports/examples.parquet')"
)
"""The table macro ``run_examples(run_id)``: one run's example index with all its columns."""


LOCK_TIMEOUT = 30.0
"""Seconds a connection waits for another process to release the database (default)."""

LOCK_TIMEOUT_VARIABLE = "DAUNCE_LINEAGE_LOCK_TIMEOUT"
"""Environment variable that overrides `LOCK_TIMEOUT` (seconds, e.g. ``120``)."""

ALLOWED_SQL = (
    "one read-only query (SELECT, WITH ... SELECT, FROM ..., VALUES, DESCRIBE, SHOW or "
    "SUMMARIZE) over the lineage tables and the views over the workspace's Parquet exports"
)
"""What `Lineage.query` runs; everything else (ATTACH, COPY, INSTALL, LOAD, PRAGMA, SET, CREATE,
INSERT, EXPORT, CALL, several statements, ...) is refused."""

_CORRUPT = (
    "not a valid DuckDB database file",
    "Could not read enough bytes",
    "Corrupt database file",
    "checksum",
)
_LOCKED = ("Could not set lock on file", "Conflicting lock")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Lineage:
    """The lineage database at ``path`` (created with its schema on first use).

    Args:
        path: The DuckDB file (``<workspace>/lineage.duckdb``).
        lock_timeout: Seconds to wait while another process holds the file; default
            ``$DAUNCE_LINEAGE_LOCK_TIMEOUT``, else `LOCK_TIMEOUT` (30).
    """

    def __init__(self, path: str | Path, lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.lock_timeout = _lock_timeout() if lock_timeout is None else float(lock_timeout)

    @contextmanager
    def connect(self, read_only: bool = False):
        """A short-lived connection (writers also create the schema).

        Raises:
            DaunceError: If the file is corrupt, or another process still holds it after
                ``lock_timeout`` seconds of retries with backoff.
        """
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only)
        try:
            if not read_only:
                con.execute(SCHEMA)
            yield con
        except duckdb.Error as error:  # a damaged block shows only when it is read
            if _corrupt(error, self.path):
                raise _open_error(self.path, error) from error
            raise
        finally:
            con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying with backoff (0.05 s doubling to 1 s) while it is locked."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as error:
                if not any(text in str(error) for text in _LOCKED):
                    raise _open_error(self.path, error) from error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _lock_error(self.path, error, self.lock_timeout) from error
            time.sleep(min(delay, left))
            delay = min(2 * delay, 1.0)

    @contextmanager
    def query_connection(self, parquet_root: str | Path):
        """A read-only connection confined to this database and the exports below ``parquet_root``.

        Views over the Parquet files found now (temporary ones, shadowing the stored views) are
        created first; then only those files may be read (``allowed_paths``), all other file and
        network access is off (``enable_external_access = false``, no extension autoloading)
        and the configuration is locked, so no statement can undo it.
        """
        with self.connect(read_only=True) as con:
            _confine(con, view_files(parquet_root), parquet_root)
            yield con

    def query(self, sql: str, parquet_root: str | Path):
        """Run a user's ``sql`` (see `ALLOWED_SQL`) on a confined connection; a polars frame.

        Raises:
            DaunceError: If ``sql`` is not a single read-only query, naming what is allowed.
            duckdb.Error: If the query fails (a missing table, a file outside the workspace).
        """
        with self.query_connection(parquet_root) as con:
            check_read_only(con, sql)
            return query_frame(con, sql)

    def start_run(self, run_id: str, name: str, config: dict, digest: str, **facts) -> None:
        """Record a run as ``running`` (updating an earlier record of the same run).

        An earlier record's ``seconds`` and ``finished_at`` (of the last run that computed
        something) are kept until this run computes something (`finish_run`).
        """
        with self.connect() as con:
            con.execute("DELETE FROM params WHERE run_id = ?", [run_id])
            con.execute(
                "INSERT INTO runs (run_id, name, config_digest, config, code_version, status,"
                " num_models, num_train, num_queries, started_at, run_dir, message) VALUES"
                " (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, NULL) ON CONFLICT (run_id) DO UPDATE"
                " SET name = excluded.name, config_digest = excluded.config_digest, config ="
                " excluded.config, code_version = excluded.code_version, status = 'running',"
                " num_models = excluded.num_models, num_train = excluded.num_train, num_queries ="
                " excluded.num_queries, started_at = excluded.started_at, run_dir ="
                " excluded.run_dir, message = NULL",
                [
                    run_id,
                    name,
                    digest,
                    json.dumps(config),
                    facts.get("code_version"),
                    facts.get("num_models"),
                    facts.get("num_train"),
                    facts.get("num_queries"),
                    _now(),
                    facts.get("run_dir"),
                ],
            )
            con.executemany(
                "INSERT INTO params VALUES (?, ?, ?)",
                [[run_id, key, json.dumps(value)] for key, value in _flatten(config).items()],
            )

    def finish_run(
        self, run_id: str, status: str, seconds: float, message: str = "", computed: bool = True
    ) -> None:
        """Record the end of a run: ``completed`` or ``failed``, its duration and a message.

        ``last_checked_at`` is always this moment; ``seconds`` and ``finished_at`` only when the
        run ``computed`` something (trained, measured or scored): a rerun served entirely from
        the workspace keeps the time of the run that computed the results.
        """
        timing = ", finished_at = $now, seconds = $seconds" if computed else ""
        with self.connect() as con:
            con.execute(
                f"UPDATE runs SET status = $status, message = $message, last_checked_at = $now"
                f"{timing} WHERE run_id = $run_id",
                {"status": status, "message": message, "now": _now(), "run_id": run_id}
                | ({"seconds": seconds} if computed else {}),
            )

    def record_copies(self, run_id: str, records: list) -> None:
        """Replace the ``copies`` rows of ``run_id`` with its copies' records (status, jobs, cost).

        ``SELECT sum(trained_tokens) FROM copies WHERE run_id = ...`` is what an API run's
        fine-tuning cost; ``job_state`` is each copy's job as the server last reported it;
        ``lr``, ``steps``, ``residual`` and ``converged`` how an in-process copy trained (NULL
        for remote kinds, and ``residual``/``converged`` without a ``train.tolerance``).
        """
        rows = []
        for r in records:
            usage = r.usage  # None: a kind that does not count (torch, hf_lora): NULL
            counts = [None if usage is None else usage.get(name, 0) for name in USAGE_COLUMNS]
            fixed = [run_id, r.k, r.status, r.attempts, r.seconds, r.job_id, r.job_state]
            training = r.training or {}
            fit = [training.get(name) for name in ("lr", "steps", "residual", "converged")]
            rows.append([*fixed, json.dumps(r.jobs), *counts, *fit])
        columns = (
            "run_id, k, status, attempts, seconds, job_id, job_state, jobs, requests, retries, "
            "prompt_tokens, completion_tokens, trained_tokens, jobs_created, jobs_adopted, "
            "search_calls, search_tokens, lr, steps, residual, converged"
        )
        with self.connect() as con:
            con.execute("DELETE FROM copies WHERE run_id = ?", [run_id])
            if rows:
                marks = ", ".join("?" * len(rows[0]))
                con.executemany(f"INSERT INTO copies ({columns}) VALUES ({marks})", rows)

    def record(self, run_id: str, artifacts: list[dict], tasks: list[dict]) -> None:
        """Record artefacts (with the edges from their inputs) and task runs."""
        with self.connect() as con:
            uris = [a["uri"] for a in artifacts]
            if uris:
                con.execute(
                    "DELETE FROM artifacts WHERE run_id = ? AND uri IN (SELECT unnest(?))",
                    [run_id, uris],
                )
                con.execute(
                    "DELETE FROM edges WHERE run_id = ? AND output_uri IN (SELECT unnest(?))",
                    [run_id, uris],
                )
            for a in artifacts:
                con.execute(
                    "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        run_id,
                        a["uri"],
                        a["kind"],
                        a["digest"],
                        json.dumps(a.get("shape")),
                        a.get("producer"),
                        _now(),
                    ],
                )
                edges = [[run_id, source, a["uri"]] for source in a.get("inputs", [])]
                if edges:  # DuckDB refuses an empty executemany
                    con.executemany("INSERT INTO edges VALUES (?, ?, ?)", edges)
            con.executemany(
                "INSERT INTO task_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    [
                        run_id,
                        t.get("flow_run_id"),
                        t["task"],
                        t.get("cache_key"),
                        t["status"],
                        t.get("seconds"),
                        _now(),
                    ]
                    for t in tasks
                ],
            )

    def record_evaluation(
        self,
        run_id: str,
        metric: str,
        value: float,
        details: dict,
        method: str = "daunce",
        stderr: float | None = None,
    ) -> None:
        """Record one evaluation figure of a run's ``method`` (DAUNCE, a baseline, a file)."""
        with self.connect() as con:
            con.execute(
                "INSERT INTO evaluations (run_id, metric, value, details, created_at, method, "
                "stderr) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [run_id, metric, value, json.dumps(details), _now(), method, stderr],
            )

    def record_metrics(self, run_id: str, metrics: dict, method: str, details: dict) -> None:
        """Record figures of a run's ``method`` (``{metric: value}``), replacing earlier ones.

        A rerun records the same figures again: one row per run, method and metric remains.
        """
        with self.connect() as con:
            con.execute(
                "DELETE FROM evaluations WHERE run_id = ? AND method = ? AND metric IN "
                "(SELECT unnest(?))",
                [run_id, method, list(metrics)],
            )
            con.executemany(
                "INSERT INTO evaluations (run_id, metric, value, details, created_at, method) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    [run_id, metric, value, json.dumps(details), _now(), method]
                    for metric, value in metrics.items()
                ],
            )

    def create_views(self, parquet_root: str | Path) -> None:
        """(Re)create the views over every run's Parquet exports below ``parquet_root``.

        Also the macro ``run_examples(run_id)`` (`RUN_EXAMPLES`).
        """
        root = Path(parquet_root)
        with self.connect() as con:
            for view, patterns in VIEWS.items():
                present = [str(root / p) for p in patterns if list(root.glob(p))]
                if present:
                    con.execute(f"CREATE OR REPLACE VIEW {view} AS {_view_sql(view, present)}")
            con.execute(f"CREATE OR REPLACE {_run_examples(root)}")


def view_files(parquet_root: str | Path) -> dict[str, list[str]]:
    """The Parquet files (absolute paths) behind each view of `VIEWS` that has any now."""
    root = Path(parquet_root).resolve()
    found = {
        view: sorted({str(path) for pattern in patterns for path in root.glob(pattern)})
        for view, patterns in VIEWS.items()
    }
    return {view: files for view, files in found.items() if files}


def check_read_only(con, sql: str) -> None:
    """Refuse ``sql`` unless DuckDB's parser finds exactly one SELECT statement in it.

    Raises:
        DaunceError: Naming the statement found and `ALLOWED_SQL`.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as error:
        raise DaunceError(f"the query does not parse: {error}") from error
    kinds = [statement.type.name for statement in statements]
    if kinds != ["SELECT"]:
        found = " + ".join(kinds) or "no statement"
        raise DaunceError(
            f"daunce sql runs {ALLOWED_SQL}; got {found}. Statements such as ATTACH, COPY, "
            "INSTALL, LOAD, PRAGMA, SET, CREATE, INSERT, EXPORT or CALL are refused; to save a "
            "result, use --format csv or json and redirect the output to a file."
        )


def _view_sql(view: str, paths: list[str]) -> str:
    """The SELECT of ``view`` over the Parquet ``paths`` (`VIEW_COLUMNS` where it names them)."""
    columns = ", ".join(VIEW_COLUMNS.get(view, ("*",)))
    return f"SELECT {columns} FROM read_parquet({_sql_list(paths)}, union_by_name = true)"


def _run_examples(root: str | Path) -> str:
    """`RUN_EXAMPLES` reading below the folder of runs ``root``."""
    return RUN_EXAMPLES.format(root=_sql_list([str(Path(root).resolve())])[1:-1])


def _confine(con, files: dict[str, list[str]], root: str | Path) -> None:
    """Views over ``files``, `RUN_EXAMPLES` below ``root``; then no other file, locked settings."""
    for view, paths in files.items():
        con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS {_view_sql(view, paths)}")
    con.execute(f"CREATE OR REPLACE TEMP {_run_examples(root)}")
    allowed = [path for paths in files.values() for path in paths]
    con.execute(f"SET allowed_paths = {_sql_list(allowed)}")
    for setting in (
        "enable_external_access = false",
        "autoinstall_known_extensions = false",
        "autoload_known_extensions = false",
        "lock_configuration = true",
    ):
        con.execute(f"SET {setting}")


def _sql_list(values: list[str]) -> str:
    """A SQL list literal of strings (quotes doubled)."""
    quoted = ("'" + value.replace("'", "''") + "'" for value in values)
    return "[" + ", ".join(quoted) + "]"


def _lock_timeout() -> float:
    """`LOCK_TIMEOUT`, or the seconds ``$DAUNCE_LINEAGE_LOCK_TIMEOUT`` names."""
    text = os.environ.get(LOCK_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return LOCK_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise DaunceError(
            f"{LOCK_TIMEOUT_VARIABLE}={text!r} is not a number of seconds >= 0; set it to e.g. "
            "60, or unset it for the default of 30."
        )
    return seconds


def _open_error(path: Path, error: duckdb.Error) -> DaunceError:
    """The error for a file DuckDB cannot open for another reason than a lock."""
    if _corrupt(error, path):
        return DaunceError(
            f"the lineage database {path} is corrupt ({error}). It holds only the record of the "
            f"runs; their results under {path.parent / 'runs'} are intact. Move it aside or "
            f"delete it (rm {path}), then rerun `daunce run CONFIG` for each run you want "
            "listed again (cached results are reused, nothing is recomputed)."
        )
    return DaunceError(
        f"cannot open the lineage database {path} ({error}); check that it is a readable "
        "DuckDB file of this DuckDB version and that you may write its folder."
    )


def _corrupt(error: duckdb.Error, path: Path) -> bool:
    """Whether DuckDB's ``error`` says the database ``path`` is damaged (not one, short, bad block).

    An error that names another file (a damaged Parquet export, say) is not about ``path``.
    """
    named = re.search(r'file "([^"]+)"', str(error))
    if named and Path(named.group(1)).resolve() != path.resolve():
        return False
    return any(text in str(error) for text in _CORRUPT)


def _lock_error(path: Path, error: duckdb.Error, timeout: float) -> DaunceError:
    """The error for a file another process still holds open after ``timeout`` seconds."""
    match = re.search(r"\(PID (\d+)\)", str(error))
    holder = _describe_process(int(match.group(1))) if match else "another process"
    return DaunceError(
        f"the lineage database {path} is held open by {holder} (still after {timeout:g} s: "
        f"{error}); close that connection (a notebook's duckdb.connect, another daunce sql) and "
        f"retry, or wait longer with {LOCK_TIMEOUT_VARIABLE}=<seconds>."
    )


def _describe_process(pid: int) -> str:
    """``process <pid> (<command line>)``, the command line where /proc tells it."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"process {pid}"
    command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if len(command) > 120:
        command = command[:117] + "..."
    return f"process {pid} ({command})" if command else f"process {pid}"


def query_frame(con, sql: str, params: list | None = None):
    """Run ``sql`` on ``con`` and return the result as a polars DataFrame."""
    import polars as pl

    return pl.from_arrow(con.sql(sql, params=params or None).to_arrow_table())


def _flatten(value, prefix: str = "") -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat

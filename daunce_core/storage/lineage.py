"""Lineage of runs in one DuckDB file: runs, parameters, artefacts, edges, task runs, evaluations.

One writer process (the flow's) writes this file; it opens the database for each write and
closes it at once, so that read-only readers (``daunce sql``) are locked out only for moments —
DuckDB lets no other process open a file that one process holds open. Users' results (top-k
tables, aggregates) live in Parquet files; views over them make
``SELECT * FROM top_proponents WHERE query_id = 17`` work in this database.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from daunce_core.errors import DaunceError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, name VARCHAR, config_digest VARCHAR, config JSON,
    code_version VARCHAR, status VARCHAR, num_models INTEGER, num_train INTEGER,
    num_queries INTEGER, started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE,
    run_dir VARCHAR, message VARCHAR);
CREATE TABLE IF NOT EXISTS params (run_id VARCHAR, key VARCHAR, value VARCHAR);
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
"""

VIEWS = {
    "top_proponents": (
        "*/exports/top_proponents.parquet",
        "*/baselines/*/exports/top_proponents.parquet",
    ),
    "top_opponents": (
        "*/exports/top_opponents.parquet",
        "*/baselines/*/exports/top_opponents.parquet",
    ),
    "example_influence": ("*/exports/example_influence.parquet",),
    "examples": ("*/exports/examples.parquet",),
    "lds_results": ("*/evaluations/lds-*.parquet",),
    "lds_per_query": ("*/evaluations/lds_per_query-*.parquet",),
    "removal_results": ("*/evaluations/removal.parquet",),
}
"""Views over the Parquet files below ``<workspace>/runs``: the exports of DAUNCE (and of the
baselines, told apart by ``method``), and the evaluation results."""


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Lineage:
    """The lineage database at ``path`` (created with its schema on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextmanager
    def connect(self, read_only: bool = False, attempts: int = 50):
        """A short-lived connection; waits (up to ~10 s) while another process holds the file."""
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as error:
                if attempt == attempts - 1:
                    raise DaunceError(
                        f"the lineage database {self.path} is held open by another process "
                        f"({error}); close that connection (a notebook, another daunce sql) "
                        "and retry."
                    ) from error
                time.sleep(0.2)
        try:
            if not read_only:
                con.execute(SCHEMA)
            yield con
        finally:
            con.close()

    def start_run(self, run_id: str, name: str, config: dict, digest: str, **facts) -> None:
        """Record a run as ``running`` (replacing an earlier record of the same run)."""
        with self.connect() as con:
            con.execute("DELETE FROM params WHERE run_id = ?", [run_id])
            con.execute(
                "INSERT OR REPLACE INTO runs (run_id, name, config_digest, config, code_version,"
                " status, num_models, num_train, num_queries, started_at, run_dir, finished_at,"
                " seconds, message) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, NULL, NULL,"
                " NULL)",
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

    def finish_run(self, run_id: str, status: str, seconds: float, message: str = "") -> None:
        """Record the end of a run: ``completed`` or ``failed``, its duration and a message."""
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, seconds = ?, message = ?"
                " WHERE run_id = ?",
                [status, _now(), seconds, message, run_id],
            )

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
                con.executemany(
                    "INSERT INTO edges VALUES (?, ?, ?)",
                    [[run_id, source, a["uri"]] for source in a.get("inputs", [])],
                )
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

    def create_views(self, parquet_root: str | Path) -> None:
        """(Re)create the views over every run's Parquet exports below ``parquet_root``."""
        root = Path(parquet_root)
        with self.connect() as con:
            for view, patterns in VIEWS.items():
                present = [str(root / p) for p in patterns if list(root.glob(p))]
                if present:
                    con.execute(
                        f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM "
                        f"read_parquet({present!r}, union_by_name = true)"
                    )


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

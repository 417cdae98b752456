"""`daunce sql` is read-only and confined to its workspace (tiny real DuckDB and Parquet files)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from daunce_core.storage.exports import top_table
from daunce_core.storage.lineage import Lineage
from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent


def build_workspace(root: Path, scores=None, top_k: int = 3, run_id: str = "r1") -> Path:
    """A workspace with one completed run: lineage, top-k and example exports, views.

    Args:
        root: Folder to build ``ws/`` in.
        scores: Score matrix ``[n_train, m_query]``; default a 6 × 2 matrix of distinct scores.
        top_k: Rows exported per query (also recorded as ``exports.top_k``).
        run_id: The run's id.

    Returns:
        The workspace folder.
    """
    scores = np.arange(12.0).reshape(6, 2) - 5.5 if scores is None else np.asarray(scores)
    n, m = scores.shape
    ws = root / "ws"
    exports = ws / "runs" / run_id / "exports"
    exports.mkdir(parents=True)
    lineage = Lineage(ws / "lineage.duckdb")
    config = {"name": "tiny", "exports": {"top_k": top_k}}
    lineage.start_run(run_id, "tiny", config, "d1", num_models=4, run_dir=str(exports.parent))
    lineage.finish_run(run_id, "completed", 1.0)
    train_ids, query_ids = np.arange(n) + 100, np.arange(m)
    for name, largest in (("top_proponents", True), ("top_opponents", False)):
        frame = top_table(scores, run_id, train_ids, query_ids, top_k, largest=largest)
        frame.write_parquet(exports / f"{name}.parquet")
    pl.DataFrame(
        {
            "example_id": train_ids,
            "digest": [f"d{i}" for i in train_ids],
            "y": train_ids % 3,
            "split": ["train"] * n,
            "run_id": [run_id] * n,
        }
    ).write_parquet(exports / "examples.parquet")
    lineage.create_views(ws / "runs")
    return ws


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ws(tmp_path) -> Path:
    return build_workspace(tmp_path)


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the workspace that no query may read."""
    path = tmp_path / "outside" / "secret.csv"
    path.parent.mkdir()
    path.write_text("name,value\nTOPSECRET,1\n")
    return path


def sql(ws: Path, query: str, capsys) -> tuple[int, str, str]:
    """Run ``daunce sql query`` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(["sql", query, "--format", "csv", "--workspace", str(ws)])
    out, err = capsys.readouterr()
    return status, out, err


def test_views_over_the_exports_work_with_external_access_off(ws, capsys):
    query = (
        "WITH t AS (SELECT t.train_id, e.y FROM top_proponents t JOIN run_examples('r1') e "
        "ON e.example_id = t.train_id WHERE t.query_id = 1 AND t.rank = 1) SELECT * FROM t"
    )
    assert sql(ws, query, capsys) == (0, "train_id,y\n105,0\n", "")
    status, out, _ = sql(ws, "SELECT current_setting('enable_external_access') AS on", capsys)
    assert (status, out) == (0, "on\nfalse\n")
    assert sql(ws, "FROM runs SELECT run_id, status", capsys)[1] == "run_id,status\nr1,completed\n"
    assert sql(ws, "DESCRIBE top_opponents", capsys)[0] == 0


def test_views_do_not_depend_on_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_workspace(Path("."))  # the stored views name the exports by relative paths
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    status, out, err = sql(tmp_path / "ws", "SELECT count(*) AS n FROM top_proponents", capsys)
    assert (status, out, err) == (0, "n\n6\n", "")


def test_copy_to_an_export_or_the_database_is_refused(ws, capsys):
    export = ws / "runs" / "r1" / "exports" / "top_proponents.parquet"
    database = ws / "lineage.duckdb"
    before = {path: digest(path) for path in (export, database)}
    for target in (export, database):
        status, _, err = sql(ws, f"COPY (SELECT 42 AS x) TO '{target}' (FORMAT parquet)", capsys)
        assert status == 2
        assert "got COPY." in err
        assert "one read-only query (SELECT" in err
    assert {path: digest(path) for path in before} == before


def test_attach_read_write_is_refused_and_writes_nothing(ws, tmp_path, capsys):
    other = tmp_path / "other.duckdb"
    status, _, err = sql(ws, f"ATTACH '{other}' AS o (READ_WRITE)", capsys)
    assert status == 2
    assert "got ATTACH." in err
    status, _, err = sql(ws, f"ATTACH '{other}' AS o; CREATE TABLE o.t AS SELECT 1", capsys)
    assert status == 2
    assert "got ATTACH + CREATE." in err
    assert not other.exists()


@pytest.mark.parametrize(
    "template",
    [
        "SELECT * FROM read_csv('{path}')",
        "SELECT * FROM '{path}'",
        "SELECT content FROM read_text('{path}')",
        "SELECT content FROM read_blob('{path}')",
        "SELECT file FROM glob('{folder}/*')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT file FROM glob('/root/*')",
        "SELECT * FROM read_parquet('{workspace}/runs/r1/exports/../../../../outside/secret.csv')",
    ],
)
def test_files_outside_the_workspace_are_not_read(ws, secret, capsys, template):
    query = template.format(path=secret, folder=secret.parent, workspace=ws)
    status, out, err = sql(ws, query, capsys)
    assert (status, out) == (2, "")
    assert "TOPSECRET" not in err
    assert "reads only the lineage tables and the views" in err


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ("INSTALL httpfs", "LOAD"),
        ("LOAD httpfs", "LOAD"),
        ("PRAGMA show_tables", "PRAGMA"),
        ("SET enable_external_access = true", "SET"),
        ("RESET lock_configuration", "SET"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("INSERT INTO runs (run_id) VALUES ('x')", "INSERT"),
        ("EXPORT DATABASE '{tmp}/export'", "EXPORT"),
        ("CALL pragma_database_size()", "CALL"),
        ("CHECKPOINT", "CALL"),
        ("DETACH lineage", "DETACH"),
        ("SELECT 1; SELECT 2", "SELECT + SELECT"),
        ("", "no statement"),
    ],
)
def test_statements_other_than_one_select_are_refused(ws, tmp_path, capsys, query, kind):
    before = digest(ws / "lineage.duckdb")
    status, out, err = sql(ws, query.format(tmp=tmp_path), capsys)
    assert (status, out) == (2, "")
    assert f"got {kind}." in err
    assert "ATTACH, COPY, INSTALL" in err
    assert digest(ws / "lineage.duckdb") == before
    assert not (tmp_path / "export").exists()


def test_extensions_are_neither_installed_nor_autoloaded(ws, capsys):
    status, _, err = sql(ws, "SELECT * FROM read_csv('https://example.com/x.csv')", capsys)
    assert status == 2
    assert "reads only the lineage tables" in err
    status, _, err = sql(ws, "SELECT * FROM sqlite_scan('x.db', 't')", capsys)
    assert status == 2
    assert "the query failed" in err


def test_the_query_function_runs_no_copy(ws, tmp_path, capsys):
    target = tmp_path / "x.csv"
    status, _, err = sql(ws, f"SELECT * FROM query('COPY (SELECT 1) TO ''{target}''')", capsys)
    assert status == 2
    assert "Expected a single SELECT statement" in err
    assert not target.exists()


def test_copy_through_the_command_line_is_refused(ws):
    export = ws / "runs" / "r1" / "exports" / "top_proponents.parquet"
    before = digest(export)
    query = f"COPY (SELECT 1 AS x) TO '{export}' (FORMAT parquet)"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sql", query, "--workspace", str(ws)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "daunce: error: daunce sql runs one read-only query" in done.stderr
    assert "Traceback" not in done.stderr
    assert digest(export) == before


def test_a_writer_works_after_a_confined_reader_in_the_same_process(ws, capsys):
    assert sql(ws, "SELECT 1 AS one", capsys)[0] == 0
    Lineage(ws / "lineage.duckdb").finish_run("r1", "completed", 2.0)
    assert sql(ws, "SELECT seconds FROM runs", capsys)[1] == "seconds\n2.0\n"

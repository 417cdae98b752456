"""What ``daunce`` prints and how the lineage database copes: corrupt or locked files, a reader
in another process, ``-k`` beyond the exports, closed pipes, queries whose scores are all zero.

Tiny real DuckDB and Parquet workspaces (see `test_sql_security.build_workspace`); the lock and
pipe tests use real second processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_sql_security import ROOT, build_workspace

from daunce_core.errors import DaunceError
from daunce_core.storage.lineage import Lineage
from flows.cli import main


@pytest.fixture
def ws(tmp_path) -> Path:
    return build_workspace(tmp_path)


def daunce(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``daunce ARGV`` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def table_rows(out: str) -> list[list[str]]:
    """The cells of the data rows of the polars tables printed in ``out``."""
    lines = [line.strip("│ ") for line in out.splitlines() if line.startswith("│")]
    data = [line for line in lines if not line.startswith(("---", "rank ", "i64", "str"))]
    return [[cell.strip() for cell in line.split("┆")] for line in data]


def holder(path: Path, read_only: bool, seconds: float) -> subprocess.Popen:
    """A second process that holds ``path`` open for ``seconds``, then lives on without it."""
    code = (
        "import duckdb, time\n"
        f"con = duckdb.connect({str(path)!r}, read_only={read_only})\n"
        "print('ready', flush=True)\n"
        f"time.sleep({seconds})\n"
        "con.close()\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def stop(process: subprocess.Popen) -> None:
    """End a process this test started."""
    process.kill()
    process.wait()
    process.stdout.close()


# 2. a corrupt file is reported as corrupt, a locked one as locked


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "bad block"])
def test_a_corrupt_database_is_reported_as_corrupt(ws, capsys, damage):
    path = ws / "lineage.duckdb"
    data = path.read_bytes()
    damaged = {
        "random bytes": os.urandom(len(data)),
        "truncated": data[: len(data) // 2],
        "bad block": data[: 3 * 4096] + os.urandom(len(data) - 3 * 4096),
    }[damage]
    path.write_bytes(damaged)
    started = time.perf_counter()
    status, _, err = daunce(capsys, "runs", "--workspace", str(ws))
    assert status == 2
    assert time.perf_counter() - started < 5
    assert f"the lineage database {path} is corrupt" in err
    assert f"rm {path}" in err
    assert "are intact" in err
    assert "held open" not in err
    with pytest.raises(DaunceError, match="is corrupt"):
        Lineage(path, lock_timeout=0).finish_run("r1", "failed", 1.0)


def test_a_database_locked_by_a_writer_keeps_the_lock_message(ws, capsys, monkeypatch):
    monkeypatch.setenv("DAUNCE_LINEAGE_LOCK_TIMEOUT", "0.5")
    process = holder(ws / "lineage.duckdb", read_only=False, seconds=60)
    try:
        status, _, err = daunce(capsys, "runs", "--workspace", str(ws))
    finally:
        stop(process)
    assert status == 2
    assert f"is held open by process {process.pid} (" in err
    assert "still after 0.5 s" in err
    assert "DAUNCE_LINEAGE_LOCK_TIMEOUT=<seconds>" in err
    assert "corrupt" not in err


# 3. a reader in another process delays the writer, for a bounded time


def test_the_writer_waits_for_a_reader_in_another_process(ws):
    process = holder(ws / "lineage.duckdb", read_only=True, seconds=1.5)
    try:
        started = time.perf_counter()
        Lineage(ws / "lineage.duckdb", lock_timeout=20).finish_run("r1", "completed", 7.0)
        waited = time.perf_counter() - started
    finally:
        stop(process)
    assert 1.0 < waited < 10
    with Lineage(ws / "lineage.duckdb").connect(read_only=True) as con:
        assert con.execute("SELECT seconds FROM runs").fetchone() == (7.0,)


def test_the_writer_gives_up_after_its_timeout_naming_the_reader(ws):
    process = holder(ws / "lineage.duckdb", read_only=True, seconds=60)
    try:
        started = time.perf_counter()
        with pytest.raises(DaunceError) as caught:
            Lineage(ws / "lineage.duckdb", lock_timeout=1).record_evaluation("r1", "lds", 0.5, {})
        waited = time.perf_counter() - started
    finally:
        stop(process)
    assert 1.0 <= waited < 5
    message = str(caught.value)
    assert f"held open by process {process.pid} ({sys.executable} -c import duckdb" in message
    assert "still after 1 s" in message
    assert "close that connection" in message


def test_the_lock_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DAUNCE_LINEAGE_LOCK_TIMEOUT", raising=False)
    assert Lineage(tmp_path / "l.duckdb").lock_timeout == 30
    monkeypatch.setenv("DAUNCE_LINEAGE_LOCK_TIMEOUT", "2.5")
    assert Lineage(tmp_path / "l.duckdb").lock_timeout == 2.5
    assert Lineage(tmp_path / "l.duckdb", lock_timeout=4).lock_timeout == 4
    monkeypatch.setenv("DAUNCE_LINEAGE_LOCK_TIMEOUT", "soon")
    with pytest.raises(DaunceError, match="DAUNCE_LINEAGE_LOCK_TIMEOUT='soon' is not a number"):
        Lineage(tmp_path / "l.duckdb")


# 4. -k beyond the exported top_k says so


def test_top_names_exports_top_k_when_k_exceeds_it(ws, capsys):
    status, out, err = daunce(capsys, "top", "--query", "1", "-k", "5", "--workspace", str(ws))
    assert status == 0
    assert [row[0] for row in table_rows(out)] == ["1", "2", "3"]
    assert "exported only the top 3 proponents per query (exports.top_k = 3)" in err
    assert "set exports.top_k: 5 (or more)" in err
    status, _, err = daunce(capsys, "top", "--query", "1", "-k", "3", "--workspace", str(ws))
    assert (status, err) == (0, "")


def test_top_says_when_the_run_has_fewer_examples_than_k(tmp_path, capsys):
    ws = build_workspace(tmp_path, top_k=10)
    status, _, err = daunce(capsys, "top", "--query", "0", "-k", "8", "--workspace", str(ws))
    assert status == 0
    assert "ranks only 6 training examples (all it has)" in err


# 5. a closed pipe ends the command quietly


@pytest.mark.parametrize("query", ["SELECT 1 AS x", "SELECT * FROM range(300000)"])
def test_a_closed_pipe_ends_quietly(ws, query):
    command = [sys.executable, "-m", "flows.cli", "sql", query, "--format", "csv"]
    process = subprocess.Popen(
        [*command, "--workspace", str(ws)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # the reader is gone before the first byte
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 141
    assert err == ""


def test_piping_into_head_prints_the_first_line_and_no_traceback(ws):
    query = "SELECT range AS i FROM range(300000)"
    cli = f"{sys.executable} -m flows.cli sql '{query}' --format csv --workspace '{ws}'"
    for reader, first in (("head -1", "i\n"), ("true", "")):  # true leaves before any byte
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {cli} | {reader}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.stdout, done.stderr) == (first, "")
        assert done.returncode in ((0, 141) if reader == "head -1" else (141,))


# 6. all-zero scores are no ranking


def scores_with(column: list[float]) -> np.ndarray:
    """A 6 × 2 score matrix: query 0 gets ``column``, query 1 distinct scores."""
    return np.stack([np.array(column, dtype=float), np.arange(6.0) - 2.5], axis=1)


def test_top_says_a_query_with_all_zero_scores_has_no_ranking(tmp_path, capsys):
    ws = build_workspace(tmp_path, scores=scores_with([0.0] * 6))
    for flag in ([], ["--opponents"]):
        status, out, _ = daunce(capsys, "top", "--query", "0", *flag, "--workspace", str(ws))
        assert status == 0
        assert "query 0 has no ranking in run r1: its daunce scores do not vary" in out
        assert "loss does not vary across the perturbed copies" in out
        assert table_rows(out) == []
    status, out, _ = daunce(capsys, "top", "--query", "1", "--workspace", str(ws))
    assert status == 0
    assert [row[1] for row in table_rows(out)] == ["105", "104", "103"]


def test_infinite_and_zero_scores_are_no_ranking(tmp_path, capsys):
    ws = build_workspace(tmp_path, scores=scores_with([0, np.inf, 0, 0, -np.inf, 0]))
    status, out, _ = daunce(capsys, "top", "--query", "0", "--workspace", str(ws))
    assert status == 0
    assert "has no ranking" in out
    assert table_rows(out) == []


def test_top_leaves_out_tied_zero_scores(tmp_path, capsys):
    ws = build_workspace(tmp_path, scores=scores_with([0, 0, 3.0, 0, -1.0, -2.0]))
    status, out, err = daunce(capsys, "top", "--query", "0", "--workspace", str(ws))
    assert status == 0
    assert [row[:3] for row in table_rows(out)] == [["1", "102", "3"]]
    assert "2 of the top 3 have score 0 (or not finite) and are left out" in err


def test_top_points_to_the_other_side_when_no_score_has_its_sign(tmp_path, capsys):
    ws = build_workspace(tmp_path, scores=scores_with([0, 0, 0, 0, -1.0, -2.0]))
    status, out, _ = daunce(capsys, "top", "--query", "0", "--workspace", str(ws))
    assert status == 0
    assert "no training example has a positive daunce score for query 0" in out
    assert "daunce top --query 0 --opponents" in out
    assert table_rows(out) == []
    status, out, _ = daunce(capsys, "top", "--query", "0", "--opponents", "--workspace", str(ws))
    assert status == 0
    assert [row[1] for row in table_rows(out)] == ["105", "104"]


def test_csv_of_nested_values_is_refused_naming_the_column(ws, capsys):
    query = "SELECT [1, 2] AS pair, 3 AS x"
    status, _, err = daunce(capsys, "sql", query, "--format", "csv", "--workspace", str(ws))
    assert status == 2
    assert "CSV cannot hold the nested values of column(s) ['pair']" in err
    assert "Traceback" not in err

"""Bad data and configurations fail at once, before any training, naming the file and the fix.

Real Parquet and JSONL files. What a configuration's schema shows is refused by the real CLI
(`daunce run`) before the Prefect server starts; what only every value shows (NaN, ragged
vectors) is refused when the data is prepared; a deterministic error is never retried.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from daunce_core.errors import DaunceError, TaskError
from daunce_core.storage.sources import read_canonical
from flows import commands
from flows.cli import main
from flows.config import load_config
from tasks import copies, data, evaluation, model
from tasks.common import retry_transient, transient
from tasks.data import prepare_data

N, D, C = 24, 8, 3


def frame(n: int = N, d: int = D) -> pl.DataFrame:
    """n examples of d float32 features and an integer label in 0..C-1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return pl.DataFrame({"x": x, "y": rng.integers(0, C, n)})


def write(path: Path, table: pl.DataFrame) -> Path:
    if path.suffix == ".parquet":
        table.write_parquet(path)
    else:
        table.write_ndjson(path)
    return path


def config(tmp_path: Path, train: Path, queries: Path | None = None, **sections) -> Path:
    """A run configuration (YAML) over ``train`` (and ``queries``, default: a good file)."""
    queries = queries or write(tmp_path / "queries.parquet", frame(6))
    raw = {
        "workspace": str(tmp_path / "ws"),
        "data": {"train": {"path": str(train)}, "queries": {"path": str(queries)}},
        "task": {"kind": "classification", "input": "x", "label": "y"},
        "model": {"recipe": {"kind": "mlp", "inputs": D, "hidden": [4], "outputs": C}},
    } | sections
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def no_server(monkeypatch):
    """Fail the test, rather than start Prefect, if a command gets past its checks."""

    def refuse(workspace):
        raise AssertionError("the command got past its checks and started a Prefect server")

    monkeypatch.setattr(commands, "prefect_environment", refuse)


def daunce_run(capsys, path: Path) -> str:
    """``daunce run PATH`` in-process: it must exit with status 2; its error message."""
    capsys.readouterr()
    status = main(["run", str(path)])
    err = capsys.readouterr().err
    assert status == 2, err
    return err


def _nan(tmp_path):
    table = frame()
    x = table["x"].to_numpy().copy()
    x[[3, 11], 2] = np.nan
    x[5, 0] = np.inf
    return write(tmp_path / "nan.parquet", table.with_columns(x=x))


def _ragged(tmp_path):
    rows = [list(map(float, r)) for r in frame()["x"].to_numpy()]
    rows[7] = rows[7][:5]
    return write(tmp_path / "ragged.jsonl", pl.DataFrame({"x": rows, "y": frame()["y"]}))


# Each: what is wrong, the file, and what the error must say (file, column, rows, fix).
AT_PREPARATION = {
    "nan and inf": (
        _nan,
        r"nan\.parquet'\['x'\] holds NaN or infinite .* 3 example\(s\), "
        r"first rows \[3, 5, 11\]; drop or impute",
    ),
    "ragged vectors": (
        _ragged,
        r"column 'x' of '.*ragged\.jsonl' holds vectors of different "
        r"lengths: row 0 has 8 values, row 7 has 5 .* pad or trim",
    ),
    "empty file": (
        lambda p: write(p / "empty.parquet", frame().clear()),
        r"'.*empty\.parquet' has no examples",
    ),
}


@pytest.mark.parametrize("case", AT_PREPARATION)
def test_every_value_is_checked_when_the_data_is_prepared(tmp_path, case):
    make, match = AT_PREPARATION[case]
    path = make(tmp_path)
    with pytest.raises(DaunceError, match=match):
        prepare_data.fn([{"path": str(path)}], "train", str(tmp_path / "canonical"), "key")


def test_an_unused_text_column_is_kept_in_the_index_only(tmp_path, no_server):
    table = frame().with_columns(note=pl.lit("scanned"), source=pl.lit(None, pl.String))
    path = write(tmp_path / "train.parquet", table)
    load_config(config(tmp_path, path))
    prepare_data.fn([{"path": str(path)}], "train", str(tmp_path / "canonical"), "key")
    columns, ids = read_canonical(tmp_path / "canonical")
    assert sorted(columns) == ["x", "y"]
    assert len(ids) == N
    index = pl.read_parquet(tmp_path / "canonical" / "index.parquet")
    assert index["note"].to_list() == ["scanned"] * N


def _train(name: str, table: pl.DataFrame):
    return lambda tmp_path: config(tmp_path, write(tmp_path / name, table))


def _queries(name: str, table: pl.DataFrame):
    return lambda tmp_path: config(
        tmp_path, write(tmp_path / "train.parquet", frame()), write(tmp_path / name, table)
    )


def _with(table: pl.DataFrame, **sections):
    return lambda tmp_path: config(tmp_path, write(tmp_path / "train.parquet", table), **sections)


RECIPE = {"kind": "mlp", "inputs": D, "hidden": [4], "outputs": C}
# Each: a configuration `daunce run` refuses before Prefect starts, and its message.
AT_LOAD = {
    "empty queries": (
        _queries("q.jsonl", frame().clear()),
        r"data\.queries\.path: data file '.*q\.jsonl' has no examples",
    ),
    "labels out of range": (
        _train("train.parquet", frame().with_columns(pl.col("y") + 2)),
        r"task\.label: data\.train \(.*train\.parquet\) holds labels outside 0\.\.2 "
        r"\(model\.recipe\.outputs = 3\) in \d+ row\(s\), first rows \[",
    ),
    "float labels": (
        _train("train.jsonl", frame().with_columns(pl.col("y").cast(pl.Float64) + 0.5)),
        r"task\.label 'y': .*train\.jsonl\) holds float64 values; .* cast the labels to integers",
    ),
    "no label column": (
        _train("train.parquet", frame().select("x")),
        r"task\.label is 'y', but data\.train \(.*\) has no column 'y'; it has \['x'\]",
    ),
    "features narrower than the model": (
        _train("train.parquet", frame(d=D - 3)),
        r"model\.recipe\.inputs is 8, but each row of column 'x' of data\.train \(.*\) has 5 "
        r"values; set model\.recipe\.inputs to 5",
    ),
    "queries unlike train": (
        _queries("q.parquet", frame(6).with_columns(pl.col("y").cast(pl.Int8))),
        r"data\.queries \(.*q\.parquet\) does not match data\.train .*queries\['y'\]",
    ),
    "text as the input": (
        _train("train.parquet", frame().with_columns(x=pl.lit("a"))),
        r"task\.input is 'x', but that column of data\.train .* holds object values",
    ),
    "unknown task kind": (_with(frame(), task={"kind": "ranking"}), r"task\.kind must be one of"),
    "unknown recipe kind": (
        _with(frame(), model={"recipe": {"kind": "cnn"}}),
        r"model\.recipe\.kind must be one of \['mlp', 'linear', 'factory'\]; got 'cnn'",
    ),
    "missing checkpoint": (
        _with(frame(), model={"recipe": RECIPE, "checkpoint": "gone.safetensors"}),
        r"model\.checkpoint '.*gone\.safetensors' does not exist",
    ),
    "missing data file": (
        lambda tmp_path: config(tmp_path, tmp_path / "nowhere.parquet"),
        r"data\.train\.path: data file '.*nowhere\.parquet' does not exist",
    ),
    "unreadable data file": (
        lambda tmp_path: config(tmp_path, _text(tmp_path / "train.parquet", "not parquet")),
        r"data\.train: cannot read '.*train\.parquet' as parquet .* valid parquet file",
    ),
    "margin of a regression": (
        _with(frame(), task={"kind": "regression"}, daunce={"measurement": "margin"}),
        r"task\.kind: regression has no margin .* daunce\.measurement: margin asks for one",
    ),
    "margin outcome of a regression": (
        _with(frame(), task={"kind": "regression"}, evaluation={"lds": {"outcome": "margin"}}),
        r"regression has no margin .* evaluation\.lds\.outcome: margin asks for one",
    ),
    "mapped column absent": (
        lambda tmp_path: _mapped(tmp_path, {"x": "pixels", "y": "y"}),
        r"data\.train: '.*' has no column\(s\) \['pixels'\]; it has \['x', 'y'\]",
    ),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mapped(tmp_path: Path, columns: dict) -> Path:
    path = config(tmp_path, write(tmp_path / "train.parquet", frame()))
    raw = yaml.safe_load(path.read_text())
    raw["data"]["train"]["columns"] = columns
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("case", AT_LOAD)
def test_the_configuration_is_checked_before_prefect_starts(tmp_path, capsys, no_server, case):
    make, match = AT_LOAD[case]
    started = time.perf_counter()
    err = daunce_run(capsys, make(tmp_path))
    assert err.startswith("daunce: error: ")
    assert len(err.splitlines()) == 1, err  # one message, no traceback
    assert re.search(match, err), err
    assert time.perf_counter() - started < 10


def test_ragged_vectors_past_the_first_row_are_left_to_preparation(tmp_path, no_server):
    path = _ragged(tmp_path)
    load_config(config(tmp_path, path))  # the first row is a fine vector
    with pytest.raises(DaunceError, match="different lengths"):
        prepare_data.fn([{"path": str(path)}], "train", str(tmp_path / "canonical"), "key")


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (DaunceError("bad input"), False),
        (TaskError("bad task"), False),
        (ValueError("bad value"), False),
        (TypeError("bad type"), False),
        (KeyError("x"), False),
        (FileNotFoundError("gone"), False),
        (RuntimeError("training diverged"), False),
        (OSError("disk"), True),
        (TimeoutError("slow"), True),
        (ConnectionError("reset"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    ],
)
def test_only_transient_errors_are_retried(error, retried):
    assert transient(error) is retried


def test_every_retrying_task_retries_transient_errors_only():
    tasks = [
        getattr(module, name)
        for module in (data, model, copies, evaluation)
        for name in dir(module)
    ]
    retrying = [t for t in tasks if getattr(t, "retries", 0) and hasattr(t, "retry_condition_fn")]
    assert {t.name for t in retrying} >= {"prepare-data", "base-model", "train-copies"}
    assert all(t.retry_condition_fn is retry_transient for t in retrying)
    assert copies.train_copies.with_options(retries=5).retry_condition_fn is retry_transient


def test_a_bad_input_fails_in_one_attempt_and_io_errors_are_retried(
    tmp_path, monkeypatch, prefect_api
):
    """Real Prefect task runs: a `DaunceError` is not retried, an `OSError` is."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    calls = []
    real = data.read_sources

    def counted(*args, **kwargs):
        calls.append(len(calls))
        if fail_with is not None and len(calls) == 1:
            raise fail_with
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "read_sources", counted)
    good = write(tmp_path / "train.parquet", frame())
    bad = [{"path": str(good), "columns": {"x": "pixels"}}]
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        fail_with = None
        with pytest.raises(DaunceError, match=r"no column\(s\) \['pixels'\]"):
            prepare_data(bad, "train", str(tmp_path / "a"), "key")
        assert len(calls) == 1  # one attempt: no retry, no 1 + 5 s of delays
        calls.clear()
        fail_with = OSError("the disk went away for a moment")
        quick = prepare_data.with_options(retry_delay_seconds=0)
        record = quick([{"path": str(good)}], "train", str(tmp_path / "b"), "key")
    assert len(calls) == 2
    assert record["count"] == N

"""What a new user meets (issue 10): silent zero scores, moved workspaces, the demo's folder,
missing baselines, the ``examples`` view, cached timings, the base model's quality, curation.

Real components throughout: the attribute flow on Prefect (test harness), Zarr stores, DuckDB
files and the ``daunce`` command line (`flows.cli.main`), on a small digits MLP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pipeline_helpers import losses_of, scores_of, write_config, write_data
from prefect.testing.utilities import prefect_test_harness

from daunce_core.storage.lineage import query_frame
from flows.attribute import run_attribute
from flows.cli import main
from flows.config import load_config


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(harness, data, tmp_path_factory) -> Path:
    """The workspace of one finished run of the small digits MLP (read, never changed)."""
    root = tmp_path_factory.mktemp("finished")
    config = load_config(write_config(root / "run.yaml", root / "ws", data))
    run_attribute(config)
    return root / "ws"


def daunce(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``daunce ARGV`` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# 1. measurements that do not vary across the copies are reported, not silently scored 0


def confident_queries(folder: Path, data: dict, scale: float = 1000.0) -> dict:
    """The queries with their first 10 inputs scaled by ``scale``: a ReLU network's logits scale
    with them, so a query it answers right gets a margin so large that its float32 loss is
    exactly 0 in every copy."""
    frame = pl.read_parquet(data["queries"])
    x = np.stack(frame["x"].to_numpy())
    x[:10] *= scale
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"x": x, "y": frame["y"]}).write_parquet(folder / "queries.parquet")
    return data | {"queries": folder / "queries.parquet"}


def test_constant_measurements_are_reported_by_daunce_run(harness, data, tmp_path, capsys):
    confident = confident_queries(tmp_path / "data", data)
    config = write_config(tmp_path / "run.yaml", tmp_path / "ws", confident)
    status, _, err = daunce(capsys, "run", config)
    assert status == 0
    summary = json.loads(next((tmp_path / "ws" / "runs").glob("*/summary.json")).read_text())
    _, losses = losses_of(summary["run_dir"])
    constant = np.flatnonzero((losses == losses[0]).all(axis=0))
    assert 0 < len(constant) <= 10
    assert (losses[:, constant] == 0).all()  # the float32 losses underflow, really
    assert (scores_of(summary["run_dir"])[:, constant] == 0).all()
    ids = ", ".join(str(j) for j in constant)
    expected = f"{len(constant)} of 30 query columns (query ids {ids}) and 0 of 240 training rows"
    for part in (expected, "scores are 0 and rank nothing", "dtype: float64", "learning rate"):
        assert part in err
    assert expected in summary["warnings"][0]
    # A rerun served from the cache says it again.
    status, _, err = daunce(capsys, "run", config)
    assert status == 0
    assert expected in err


# 2. a copied or moved workspace works: served from its own artefacts, never the original's


def test_a_moved_workspace_is_served_from_its_own_artefacts(harness, data, tmp_path, capsys):
    import shutil

    original, moved = tmp_path / "ws", tmp_path / "elsewhere" / "ws2"
    config = write_config(tmp_path / "run.yaml", original, data)
    assert daunce(capsys, "run", config)[0] == 0
    _, top_before, _ = daunce(capsys, "top", "--query", 3, "--workspace", original)
    moved.parent.mkdir()
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    ws = ("--workspace", moved)
    # The read-only commands, before any run in the copy (the stored views name the original).
    status, out, _ = daunce(capsys, "top", "--query", 3, *ws)
    assert status == 0
    assert out == top_before
    status, out, _ = daunce(capsys, "status", *ws)
    assert status == 0
    assert "copies: 8 done, 0 diverged, 0 pending of 8" in out
    sql = "SELECT count(*) AS n FROM top_proponents JOIN examples USING (run_id)"
    status, out, err = daunce(capsys, "sql", sql, "--format", "csv", *ws)
    assert (status, err) == (0, "")
    assert out.splitlines()[1] != "0"
    # A rerun in the copy computes nothing: every artefact is found in the copy.
    status, out, _ = daunce(capsys, "run", config, *ws)
    assert status == 0
    assert "0 copies trained now" in out
    summary = json.loads(next((moved / "runs").glob("*/summary.json")).read_text())
    assert set(summary["states"].values()) == {"Cached"}
    assert summary["run_dir"].startswith(str(moved))
    assert not original.exists()
    for path in moved.rglob("*.json"):
        assert str(original) not in path.read_text(), path
    assert daunce(capsys, "sql", sql, *ws)[0] == 0


# 3. the demo works in ./daunce-runs of the current folder; the nightly run in its own workspace


REPO = Path(__file__).resolve().parent.parent


def test_the_demo_works_in_the_current_folder_and_the_nightly_run_apart(tmp_path, monkeypatch):
    import yaml

    from flows.commands import DEMO_CONFIG, demo_config
    from flows.curate import curate_flow

    monkeypatch.delenv("DAUNCE_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert demo_config().workspace == str(tmp_path / "daunce-runs")
    assert demo_config("mine").workspace == str(tmp_path / "mine")
    # `daunce run data/digits.yaml` follows the same default: the current folder's daunce-runs.
    assert load_config(DEMO_CONFIG).workspace == str(tmp_path / "daunce-runs")
    # The nightly deployment, as a worker in the repository root runs it, works elsewhere than
    # `make demo` there.
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly-curation")
    parameters = curate_flow.validate_parameters(nightly["parameters"])
    config = load_config(REPO / parameters["config_path"], workspace=parameters["workspace"])
    assert Path(config.workspace).parent == REPO
    assert config.workspace != demo_config().workspace


# 4. a method the run has not scored is named as such, with the methods it has and the way


def test_top_names_a_method_not_scored_yet_and_how_to_score_it(finished, capsys):
    status, out, err = daunce(
        capsys, "top", "--query", 3, "--method", "ekfac", "--workspace", finished
    )
    assert (status, out) == (2, "")
    for part in (
        "has no ekfac scores",
        "methods scored in it: daunce",
        "evaluation.baselines",
        "daunce lds CONFIG --baseline ekfac",
    ):
        assert part in err
    assert "query id" not in err  # the query is not to blame
    status, _, err = daunce(
        capsys, "top", "--query", 3, "--method", "ekfak", "--workspace", finished
    )
    assert status == 2
    assert "knows no method 'ekfak'" in err
    assert "gradient_dot" in err
    status, _, err = daunce(capsys, "top", "--query", 999, "--workspace", finished)
    assert status == 2
    assert "query id 999 has no daunce scores" in err
    assert "0..29" in err


# 5. the examples view holds what every run has; each run's own columns stay its own


def with_column(data: dict, folder: Path, name: str, value) -> dict:
    """``data`` with a scalar column ``name`` added to both files."""
    folder.mkdir(parents=True)
    paths = {}
    for split in ("train", "queries"):
        frame = pl.read_parquet(data[split]).with_columns(pl.lit(value).alias(name))
        paths[split] = folder / f"{split}.parquet"
        frame.write_parquet(paths[split])
    return paths


def test_examples_of_one_run_do_not_show_other_runs_columns(harness, data, tmp_path, capsys):
    ws = tmp_path / "ws"
    runs = {}
    for column, value in (("source", "scan"), ("weight", 0.5)):
        own = with_column(data, tmp_path / column, column, value)
        config = load_config(write_config(tmp_path / f"{column}.yaml", ws, own))
        runs[column] = run_attribute(config)["run_id"]

    def sql(query: str) -> list[dict]:
        status, out, err = daunce(capsys, "sql", query, "--format", "json", "--workspace", ws)
        assert (status, err) == (0, "")
        return json.loads(out)

    rows = sql("SELECT * FROM examples")
    assert set(rows[0]) == {"run_id", "split", "example_id", "digest"}
    assert {r["run_id"] for r in rows} == set(runs.values())
    for column, other in (("source", "weight"), ("weight", "source")):
        own = sql(f"SELECT * FROM run_examples('{runs[column]}') WHERE split = 'train'")
        assert len(own) == 240
        assert {column, "y", "example_id"} <= set(own[0])
        assert other not in own[0]
        status, out, _ = daunce(
            capsys, "top", "--query", 3, "--run", runs[column], "--workspace", ws
        )
        assert status == 0
        assert column in out
        assert other not in out


# 6. a rerun served from the workspace keeps the timing of the run that computed the results


def test_a_cached_rerun_keeps_the_timing_of_the_run_that_computed(finished, capsys):
    from daunce_core.storage.lineage import Lineage

    def timing() -> dict:
        with Lineage(finished / "lineage.duckdb").connect(read_only=True) as con:
            return query_frame(con, "SELECT * FROM runs").row(0, named=True)

    first = timing()
    assert first["status"] == "completed"
    status, out, _ = daunce(capsys, "run", finished.parent / "run.yaml")
    assert status == 0
    assert "0 copies trained now" in out
    again = timing()
    # The time of the run that computed the results, not the rerun's second or so.
    assert (again["seconds"], again["finished_at"]) == (first["seconds"], first["finished_at"])
    assert again["last_checked_at"] > first["last_checked_at"]
    assert first["last_checked_at"] == first["finished_at"]
    assert again["status"] == "completed"
    status, out, _ = daunce(capsys, "runs", "--workspace", finished)
    assert status == 0
    assert "last_checked_at" in out


# 7. the base model's quality is measured, recorded, printed, and a poor fit is flagged


def base_metrics(ws: Path) -> dict:
    from daunce_core.storage.lineage import Lineage

    with Lineage(ws / "lineage.duckdb").connect(read_only=True) as con:
        rows = con.execute(
            "SELECT metric, value FROM evaluations WHERE method = 'base_model'"
        ).fetchall()
    return dict(rows)


def train_accuracy(ws: Path, config) -> float:
    """The base model's training accuracy, measured here from the stored model and data."""
    import torch

    from daunce_core.storage.lineage import Lineage
    from tasks.common import load_base_model, load_split

    with Lineage(ws / "lineage.duckdb").connect(read_only=True) as con:
        uri = dict(con.execute("SELECT kind, uri FROM artifacts").fetchall())
        digest = dict(con.execute("SELECT kind, digest FROM artifacts").fetchall())
    model = load_base_model(config.model.recipe, uri["model/base"])
    train = load_split(uri["data/train"], digest["data/train"])
    with torch.no_grad():
        return float((model(train["x"]).argmax(1) == train["y"]).double().mean())


def test_the_base_model_quality_is_recorded_and_a_poor_fit_flagged(
    finished, data, tmp_path, capsys
):
    import yaml

    config = load_config(finished.parent / "run.yaml")
    metrics = base_metrics(finished)
    assert set(metrics) == {
        "base/train_loss",
        "base/train_accuracy",
        "base/query_loss",
        "base/query_accuracy",
        "base/majority_rate",
    }
    assert metrics["base/train_accuracy"] == pytest.approx(train_accuracy(finished, config))
    assert metrics["base/train_accuracy"] > 0.6  # 5 epochs of a 16-unit MLP: fair, not flagged
    labels = pl.read_parquet(data["train"])["y"]
    assert metrics["base/majority_rate"] == pytest.approx(
        labels.value_counts()["count"].max() / 240
    )
    # A learning rate far too small leaves the model near chance: flagged by `daunce run`.
    path = write_config(tmp_path / "run.yaml", tmp_path / "ws", data, num_models=4)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["train"] = {"lr": 1e-5, "epochs": 1, "batch_size": 32}
    path.write_text(yaml.safe_dump(raw))
    status, out, err = daunce(capsys, "run", path)
    assert status == 0
    poor = base_metrics(tmp_path / "ws")
    assert poor["base/train_accuracy"] < 0.3
    assert f"base model: accuracy on train {poor['base/train_accuracy']:.1%}" in out
    assert "the base model fits its training data poorly" in err
    assert "model.train" in err
    _, out, err = daunce(capsys, "run", finished.parent / "run.yaml")
    assert "base model: accuracy on train" in out
    assert "fits its training data poorly" not in err
    assert base_metrics(finished) == metrics  # recorded once per run, not once per rerun


# 8. the curation report shows each flagged example's label and the base model's answer


def test_the_curation_report_shows_labels_and_the_models_answers(finished, data):
    import torch

    from daunce_core.storage.lineage import Lineage
    from flows.curate import curate_flow
    from tasks.common import load_base_model

    config = load_config(finished.parent / "run.yaml")
    result = curate_flow(str(finished.parent / "run.yaml"), flag_top=6)
    report = Path(result["report"]).read_text()
    flagged = pl.read_parquet(Path(result["report"]).with_suffix(".parquet"))
    assert flagged["train_id"].to_list() == result["flagged"]
    # The label and the base model's answer, measured here from the stored model and data.
    train = pl.read_parquet(data["train"])
    x = torch.tensor(np.stack(train["x"].to_numpy()), dtype=torch.float32)
    with Lineage(finished / "lineage.duckdb").connect(read_only=True) as con:
        uri = con.execute("SELECT uri FROM artifacts WHERE kind = 'model/base'").fetchone()[0]
    with torch.no_grad():
        probability, predicted = torch.softmax(
            load_base_model(config.model.recipe, uri)(x).double(), 1
        ).max(1)
    assert "| rank | example_id | y | predicted (probability) |" in report
    for rank, i in enumerate(result["flagged"], start=1):
        row = flagged.row(rank - 1, named=True)
        assert row["label"] == train["y"][i]
        assert row["predicted"] == int(predicted[i])
        assert row["probability"] == pytest.approx(float(probability[i]), rel=1e-5)
        mark = "≠" if row["predicted"] != row["label"] else ""
        answer = f"{row['predicted']} ({row['probability']:.3f})"
        assert f"| {rank} | {i} | {row['label']} | {answer} | {mark} |" in report

"""Every artefact of a run is recomputed, or named, when it is deleted or damaged.

Real Prefect (test harness), real Zarr stores, real DuckDB files: a finished run is damaged one
artefact kind at a time and run again; each time the scores must equal the undamaged run's and
the lineage must still answer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import losses_of, scores_of, write_config, write_data

from daunce_core.storage.layout import RunLayout, Workspace
from daunce_core.storage.lineage import Lineage, query_frame
from daunce_core.storage.sources import DataSource
from flows.attribute import run_attribute
from flows.config import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), n=120, m=12)


def _first_file(folder: Path) -> Path:
    return next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "zarr.json")


def _garble(path: Path) -> None:
    path.write_bytes(b"\x13garbage" * max(1, path.stat().st_size // 8))


def _damage(kind: str, ws: Workspace, run: RunLayout) -> None:
    """Delete or damage one artefact of ``kind``."""
    if kind == "canonical data":
        _garble(next((ws.root / "data").rglob("index.parquet")))
    elif kind == "base model":
        path = next((ws.root / "models").rglob("base.safetensors"))
        path.write_bytes(path.read_bytes()[:100])  # truncated
    elif kind == "base signals":
        next((ws.root / "signals").rglob("signals.safetensors")).unlink()
    elif kind == "copy parameters":
        run.copy(3).unlink()
    elif kind == "copy record":
        run.copy_record(5).write_text("{oops")
    elif kind == "loss chunk (bytes)":
        _garble(_first_file(run.store / "losses_train"))
    elif kind == "loss chunk (deleted)":
        _first_file(run.store / "losses_query").unlink()
    elif kind == "scores":
        shutil.rmtree(run.scores)
    elif kind == "export":
        run.export("top_proponents").unlink()
    elif kind == "self-influence":
        shutil.rmtree(run.store / "self_influence")
    elif kind == "run identity":
        run.identity.write_text('{"identity": ')
    elif kind == "loss array metadata":
        _garble(run.store / "losses_train" / "zarr.json")


KINDS = [
    "canonical data",
    "base model",
    "base signals",
    "copy parameters",
    "copy record",
    "loss chunk (bytes)",
    "loss chunk (deleted)",
    "scores",
    "export",
    "self-influence",
    "run identity",
    "loss array metadata",
]


def test_each_damaged_artefact_is_recomputed(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)
    scores, (train, query) = scores_of(first["run_dir"]), losses_of(first["run_dir"])
    ws, run = Workspace(config.workspace), RunLayout(first["run_dir"])
    for kind in KINDS:
        _damage(kind, ws, run)
        again = run_attribute(config)
        np.testing.assert_array_equal(scores_of(again["run_dir"]), scores, err_msg=kind)
        np.testing.assert_array_equal(losses_of(again["run_dir"])[0], train, err_msg=kind)
        np.testing.assert_array_equal(losses_of(again["run_dir"])[1], query, err_msg=kind)
        assert run.export("top_proponents").exists(), kind
    with Lineage(ws.lineage).connect(read_only=True) as con:
        top = query_frame(con, "SELECT count(*) AS n FROM top_proponents")
    assert top["n"][0] == 12 * 5


def test_a_damaged_loss_chunk_is_measured_again_not_retrained(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)
    run = RunLayout(first["run_dir"])
    _garble(_first_file(run.store / "losses_train"))
    again = run_attribute(config)
    assert again["trained_now"] == 0
    assert again["remeasured"] == [0]
    record = json.loads(run.copy_record(0).read_text())
    assert record["attempts"] == 1


def test_switching_the_query_set_and_back(harness, data, tmp_path):
    other = write_data(tmp_path / "other", n=10, m=12)["queries"]
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)
    swapped = dataclasses.replace(
        config, data=dataclasses.replace(config.data, queries=DataSource(path=str(other)))
    )
    middle = run_attribute(swapped)
    assert middle["trained_now"] == 0
    back = run_attribute(config)
    assert back["trained_now"] == 0
    np.testing.assert_array_equal(scores_of(back["run_dir"]), scores_of(first["run_dir"]))
    both = dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, queries=[config.data.queries, DataSource(str(other))]
        ),
    )
    assert run_attribute(both)["num_queries"] == 24
    np.testing.assert_array_equal(
        scores_of(run_attribute(config)["run_dir"]), scores_of(first["run_dir"])
    )


def test_changing_how_copies_are_computed_reuses_the_run(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)
    compute = dataclasses.replace(config.compute, group_size=3, eval_batch_size=7, device="cpu")
    again = run_attribute(dataclasses.replace(config, compute=compute))
    assert again["run_id"] == first["run_id"]
    assert again["trained_now"] == 0
    assert set(again["states"].values()) == {"Cached"}


def test_float64_runs_store_float64_losses(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data, dtype="float64"))
    result = run_attribute(config)
    assert losses_of(result["run_dir"])[0].dtype == np.float64


def test_a_failed_rerun_keeps_an_intact_completed_run_completed(
    harness, data, tmp_path, monkeypatch
):
    import flows.attribute

    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)

    def broken(*args, **kwargs):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(flows.attribute, "_run_copies", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        run_attribute(config)
    with Lineage(Workspace(config.workspace).lineage).connect(read_only=True) as con:
        status, message = con.execute(
            "SELECT status, message FROM runs WHERE run_id = ?", [first["run_id"]]
        ).fetchone()
    assert status == "completed"
    assert "a rerun failed" in message
    shutil.rmtree(RunLayout(first["run_dir"]).exports)  # now the results are gone: failed
    with pytest.raises(RuntimeError):
        run_attribute(config)
    with Lineage(Workspace(config.workspace).lineage).connect(read_only=True) as con:
        row = con.execute("SELECT status FROM runs WHERE run_id = ?", [first["run_id"]])
        assert row.fetchone()[0] == "failed"


def test_a_moved_training_file_reuses_the_run(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)
    moved = {split: tmp_path / "moved" / path.name for split, path in data.items()}
    moved["train"].parent.mkdir()
    for split, path in data.items():
        shutil.copy(path, moved[split])
    again = run_attribute(load_config(write_config(tmp_path / "b.yaml", tmp_path / "ws", moved)))
    assert again["run_id"] == first["run_id"]
    assert again["trained_now"] == 0
    assert again["states"]["base-model[model]"] == "Cached"
    np.testing.assert_array_equal(scores_of(again["run_dir"]), scores_of(first["run_dir"]))


def test_a_run_asking_for_fewer_copies_than_stored_scores_the_first(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    more = dataclasses.replace(config, daunce=dataclasses.replace(config.daunce, num_models=12))
    run_attribute(more)  # as after `daunce extend --num-models 12`
    again = run_attribute(config)  # the original configuration, K = 8
    assert again["trained_now"] == 0
    fresh = run_attribute(dataclasses.replace(config, workspace=str(tmp_path / "fresh")))
    np.testing.assert_array_equal(scores_of(again["run_dir"]), scores_of(fresh["run_dir"]))
    assert losses_of(again["run_dir"])[0].shape[0] == 12  # the other copies are kept


def test_status_tells_an_interrupted_run_from_a_running_one(harness, data, tmp_path, capsys):
    from flows.cli import main

    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run_attribute(config)
    with Lineage(Workspace(config.workspace).lineage).connect() as con:
        con.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", [first["run_id"]])
    assert main(["status", "--workspace", config.workspace]) == 0
    assert "interrupted (no process is running it" in capsys.readouterr().out

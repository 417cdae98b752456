"""The attribute flow on real Prefect (test harness), real Zarr stores and real DuckDB files."""

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pipeline_helpers import exploding_data, losses_of, scores_of, write_config, write_data

from daunce_core import ClassificationTask, TorchModuleAccess
from daunce_core.access.torch_module.models import build_model, save_parameters
from daunce_core.errors import DaunceError
from daunce_core.method.draws import draw_perturbation
from daunce_core.storage.digest import digest_rows
from daunce_core.storage.lineage import Lineage, query_frame
from daunce_core.storage.sources import DataSource
from flows.attribute import claim_run_dir, run_attribute
from flows.cli import main
from flows.config import ExportConfig, load_config
from flows.lock import workspace_lock
from tasks.common import load_base_model, load_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def run(config, **kwargs):
    return run_attribute(config, **kwargs)


def test_end_to_end_then_served_from_cache(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "run.yaml", tmp_path / "ws", data))
    first = run(config)
    assert first["trained_now"] == 8
    scores = scores_of(first["run_dir"])
    assert scores.shape == (240, 30)
    assert np.isfinite(scores).all()
    # The stored loss rows are exactly the library's copies of the same base model.
    spec_model = load_base_model(config.model.recipe, _artifact(config, "model/base"))
    train = load_split(_artifact(config, "data/train"), _digest(config, "data/train"))
    queries = load_split(_artifact(config, "data/queries"), _digest(config, "data/queries"))
    rows = TorchModuleAccess(
        spec_model, ClassificationTask(), train, queries, config.daunce, base_l2=config.model.l2
    ).run(range(8))
    stored_train, stored_query = losses_of(first["run_dir"])
    np.testing.assert_allclose(stored_train, rows.train, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stored_query, rows.query, rtol=1e-5, atol=1e-7)
    # A rerun computes nothing: every task is served from the cache.
    second = run(config)
    assert second["trained_now"] == 0
    assert set(second["states"].values()) == {"Cached"}
    np.testing.assert_array_equal(scores_of(second["run_dir"]), scores)
    # SQL over the exports and the lineage.
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        top = query_frame(con, "SELECT * FROM top_proponents WHERE query_id = 17 ORDER BY rank")
        run_row = query_frame(con, "SELECT status, num_models FROM runs")
        edges = query_frame(con, "SELECT * FROM edges")
    assert top["rank"].to_list() == [1, 2, 3, 4, 5]
    best = int(np.argmax(scores[:, 17]))
    assert top["train_id"][0] == best
    assert run_row.row(0) == ("completed", 8)
    assert edges.height >= 5


def _artifact(config, kind):
    with Lineage(config.workspace + "/lineage.duckdb").connect(read_only=True) as con:
        row = con.execute(
            "SELECT uri FROM artifacts WHERE kind = ? ORDER BY created_at DESC", [kind]
        ).fetchone()
    return row[0]


def _digest(config, kind):
    with Lineage(config.workspace + "/lineage.duckdb").connect(read_only=True) as con:
        return con.execute(
            "SELECT digest FROM artifacts WHERE kind = ? ORDER BY created_at DESC", [kind]
        ).fetchone()[0]


def test_changing_a_daunce_setting_recomputes_only_what_depends_on_it(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    run(config)
    changed = load_config(
        write_config(tmp_path / "b.yaml", tmp_path / "ws", data, train={"lr": 0.02, "epochs": 1})
    )
    result = run(changed)
    states = result["states"]
    assert states["prepare-data[train]"] == "Cached"
    assert states["base-model[model]"] == "Cached"
    assert states["base-signals[signals]"] == "Cached"
    assert {v for k, v in states.items() if k.startswith("train-copies")} == {"Completed"}
    assert result["trained_now"] == 8


def test_extending_k_trains_only_new_copies_and_equals_a_fresh_run(harness, data, tmp_path):
    small = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    run(small)
    bigger = dataclasses.replace(small, daunce=dataclasses.replace(small.daunce, num_models=16))
    extended = run(bigger)
    assert extended["trained_now"] == 8
    assert extended["run_id"] == small.run_id()
    fresh = run(dataclasses.replace(bigger, workspace=str(tmp_path / "fresh")))
    np.testing.assert_array_equal(scores_of(extended["run_dir"]), scores_of(fresh["run_dir"]))


def test_adding_queries_only_evaluates_and_equals_a_fresh_run(harness, data, tmp_path):
    extra = write_data(tmp_path / "extra", n=10, m=12)["queries"]
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    run(config)
    sources = [config.data.queries, DataSource(path=str(extra))]
    more = dataclasses.replace(config, data=dataclasses.replace(config.data, queries=sources))
    added = run(more)
    assert added["trained_now"] == 0
    assert added["num_queries"] == 42
    fresh = run(dataclasses.replace(more, workspace=str(tmp_path / "fresh")))
    np.testing.assert_allclose(
        scores_of(added["run_dir"]), scores_of(fresh["run_dir"]), rtol=1e-5, atol=1e-6
    )
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        ids = query_frame(
            con,
            "SELECT example_id FROM examples WHERE split = 'queries' AND run_id = ? ORDER BY 1",
            [config.run_id()],
        )
    assert ids["example_id"].to_list() == list(range(42))


def test_diverged_copies_are_left_out_and_reported(harness, tmp_path):
    # Least squares where example 5's only feature is orthogonal to the others and huge: the
    # copies that train on it overflow, the others never move along it (see test_training).
    x, y = exploding_data()
    pl.DataFrame({"x": x.numpy(), "y": y.numpy()}).write_parquet(tmp_path / "train.parquet")
    recipe = {"kind": "linear", "inputs": 7, "outputs": 1}
    save_parameters(build_model(recipe), tmp_path / "base.safetensors")
    path = write_config(
        tmp_path / "a.yaml",
        tmp_path / "ws",
        {"train": tmp_path / "train.parquet", "queries": tmp_path / "train.parquet"},
        subset_ratio=0.3,
        group_size=8,
        train={"lr": 0.1, "epochs": 3, "batch_size": 6},
        objective={"labels": "observed", "rho": 1.0},  # the paper's form: these copies overflow
    )
    config = load_config(path, check_data=False)  # the data fit the model set below
    model = dataclasses.replace(
        config.model, recipe=recipe, checkpoint=str(tmp_path / "base.safetensors")
    )
    config = dataclasses.replace(config, model=model, task={"kind": "regression"})
    poisoned = [
        k for k in range(8) if 5 in draw_perturbation(60, k, seed=0, subset_ratio=0.3).subset
    ]
    assert 0 < len(poisoned) < 8
    result = run(config)
    assert result["excluded"] == poisoned
    scores = scores_of(result["run_dir"])
    assert np.isfinite(scores).all()
    _, stored_query = losses_of(result["run_dir"])
    assert np.isnan(stored_query[poisoned]).all()


def test_a_run_folder_is_not_reused_for_another_configuration(data, tmp_path):
    first = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    other = load_config(write_config(tmp_path / "b.yaml", tmp_path / "ws", data, seed=5))
    folder = tmp_path / "ws" / "runs" / "pinned"
    claim_run_dir(folder, first, overwrite=False)
    (folder / "keep.txt").write_text("computed")
    with pytest.raises(DaunceError, match=r"different configuration.*--overwrite"):
        claim_run_dir(folder, other, overwrite=False)
    assert (folder / "keep.txt").exists()  # nothing lost
    claim_run_dir(folder, other, overwrite=True)
    assert json.loads((folder / "run.json").read_text())["digest"] == other.digest()


def test_bad_configuration_names_the_field(data, tmp_path, capsys):
    path = write_config(tmp_path / "a.yaml", tmp_path / "ws", data, num_modles=3)
    assert main(["run", str(path)]) == 2
    assert "daunce.num_modles" in capsys.readouterr().err
    path = write_config(tmp_path / "b.yaml", tmp_path / "ws", data, subset_ratio=2.0)
    assert main(["run", str(path)]) == 2
    assert "config field daunce: subset_ratio must be in (0, 1]" in capsys.readouterr().err


def test_prepared_data_keeps_ids_and_content_digests(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    run(config)
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        examples = query_frame(
            con,
            "SELECT * FROM run_examples(?) WHERE split = 'train' ORDER BY example_id",
            [config.run_id()],
        )
    assert examples["example_id"].to_list() == list(range(240))
    source = pl.read_parquet(data["train"])
    columns = {"x": np.stack(source["x"].to_numpy()), "y": source["y"].to_numpy()}
    assert examples["digest"].to_list() == digest_rows(columns)
    assert examples["y"].to_list() == source["y"].to_list()


def test_cli_answers_queries_on_a_finished_run(harness, data, tmp_path, capsys):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    result = run(config)
    capsys.readouterr()
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main(["top", "--query", "3", "-k", "4", *ws]) == 0
    assert "proponents of query 3" in capsys.readouterr().out
    assert main(["top", "--query", "3", "--opponents", *ws]) == 0
    assert "opponents of query 3" in capsys.readouterr().out
    sql = "SELECT query_id, rank, train_id FROM top_proponents WHERE query_id = 17 ORDER BY rank"
    assert main(["sql", sql, "--format", "json", *ws]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert main(["sql", sql, "--format", "csv", *ws]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "query_id,rank,train_id"
    assert main(["runs", *ws]) == 0
    assert result["run_id"] in capsys.readouterr().out
    assert main(["status", *ws]) == 0
    assert "copies: 8 done, 0 diverged, 0 pending of 8" in capsys.readouterr().out
    assert main(["top", "--query", "999", *ws]) == 2
    assert "has no daunce scores" in capsys.readouterr().err
    assert main(["top", "--query", "3", "--run", "no-such-run", *ws]) == 2
    assert "run no-such-run has no top-k exports" in capsys.readouterr().err
    assert main(["top", "--query", "3", "-k", "0", *ws]) == 2
    assert "-k must be at least 1" in capsys.readouterr().err
    assert main(["sql", "SELECT * FROM nowhere", *ws]) == 2
    assert main(["runs", "--workspace", str(tmp_path / "empty")]) == 2


def test_run_id_follows_the_data_content_not_its_location(data, tmp_path):
    first = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    moved = {}
    for split, path in data.items():
        moved[split] = tmp_path / "elsewhere" / path.name
        moved[split].parent.mkdir(exist_ok=True)
        moved[split].write_bytes(path.read_bytes())
    second = load_config(write_config(tmp_path / "b.yaml", tmp_path / "other-ws", moved))
    assert second.run_id() == first.run_id()
    frame = pl.read_parquet(moved["train"])
    frame.with_columns(pl.col("y").reverse()).write_parquet(moved["train"])
    third = load_config(write_config(tmp_path / "c.yaml", tmp_path / "ws", moved))
    assert third.run_id() != first.run_id()


def test_changed_query_file_is_measured_again(harness, data, tmp_path):
    queries = tmp_path / "queries.parquet"
    queries.write_bytes(data["queries"].read_bytes())
    paths = {"train": data["train"], "queries": queries}
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", paths))
    run(config)
    frame = pl.read_parquet(queries)
    frame.with_columns(pl.col("y").reverse()).write_parquet(queries)  # same count, new content
    changed = run(load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", paths)))
    assert changed["run_id"] == config.run_id()
    assert changed["trained_now"] == 0
    fresh = run(dataclasses.replace(config, workspace=str(tmp_path / "fresh")))
    np.testing.assert_allclose(
        scores_of(changed["run_dir"]), scores_of(fresh["run_dir"]), rtol=1e-5, atol=1e-6
    )


def test_deleted_results_are_recomputed_not_served_from_cache(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    first = run(config)
    shutil.rmtree(first["run_dir"])
    shutil.rmtree(tmp_path / "ws" / "models")
    again = run(config)
    assert again["trained_now"] == 8
    assert again["states"]["base-model[model]"] == "Completed"
    np.testing.assert_array_equal(scores_of(again["run_dir"]), scores_of(first["run_dir"]))


def test_exports_follow_the_current_settings(harness, data, tmp_path):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    for k in (5, 3, 5):
        result = run(dataclasses.replace(config, exports=ExportConfig(top_k=k)))
        top = pl.read_parquet(Path(result["run_dir"]) / "exports" / "top_proponents.parquet")
        assert top["rank"].max() == k


def test_one_run_at_a_time_per_workspace(data, tmp_path, capsys):
    config = load_config(write_config(tmp_path / "a.yaml", tmp_path / "ws", data))
    held, release = threading.Event(), threading.Event()

    def other_run():  # another run holding the workspace, in another thread
        with workspace_lock(tmp_path / "ws"):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    held.wait(60)
    try:
        with pytest.raises(DaunceError, match="another daunce run"):
            run(config)
        # The command refuses before it starts a Prefect server (no server output at all).
        assert main(["run", str(tmp_path / "a.yaml")]) == 2
        assert "another daunce run is working" in capsys.readouterr().err
    finally:
        release.set()
        thread.join()

"""``score: subspace`` in the attribute flow: out of core, equal to the in-memory library."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import scores_of, write_config, write_data

from daunce_core import ClassificationTask, TorchModuleAccess
from daunce_core.errors import DaunceError
from daunce_core.method.subspace import subspace_scores
from daunce_core.storage.lineage import Lineage
from daunce_core.storage.zarr_store import RunStore
from flows.attribute import run_attribute
from flows.config import load_config
from tasks.common import load_base_model, load_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), n=150, m=12)


def config_of(tmp_path, data, name="run.yaml", workspace="ws", **daunce):
    settings = {"num_models": 6, "score": "subspace", "group_size": 4} | daunce
    return load_config(write_config(tmp_path / name, tmp_path / workspace, data, **settings))


def uri(config, kind, column="uri"):
    with Lineage(Path(config.workspace) / "lineage.duckdb").connect(read_only=True) as con:
        return con.execute(
            f"SELECT {column} FROM artifacts WHERE kind = ? ORDER BY created_at DESC", [kind]
        ).fetchone()[0]


def library_scores(config, num_models):
    """The same copies and scores from `TorchModuleAccess` in memory (the oracle)."""
    model = load_base_model(config.model.recipe, uri(config, "model/base"))
    train, queries = (
        load_split(uri(config, f"data/{split}"), uri(config, f"data/{split}", "digest"))
        for split in ("train", "queries")
    )
    access = TorchModuleAccess(
        model, ClassificationTask(), train, queries, config.daunce, base_l2=config.model.l2
    )
    _, parts = access.run_subspace(range(num_models))
    return subspace_scores(parts.train.central(), parts.query.central(), parts.curvature)


def test_pipeline_subspace_scores_equal_the_library_and_extend_with_k(harness, data, tmp_path):
    config = config_of(tmp_path, data)
    first = run_attribute(config)
    scores = scores_of(first["run_dir"])
    assert scores.shape == (150, 12)
    expected = library_scores(config, 6)
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    assert any(k.startswith("reflect-copies") for k in first["states"])
    # A rerun measures nothing again.
    again = run_attribute(config)
    assert again["trained_now"] == 0
    assert {v for k, v in again["states"].items() if k.startswith("reflect")} == {"Cached"}
    # More copies: only the new ones are trained and reflected; Q spans all of them.
    bigger = config_of(tmp_path, data, name="big.yaml", num_models=9)
    extended = run_attribute(bigger)
    assert extended["trained_now"] == 3
    np.testing.assert_allclose(
        scores_of(extended["run_dir"]), library_scores(bigger, 9), rtol=2e-4, atol=1e-6
    )


def test_a_damaged_reflection_is_measured_again(harness, data, tmp_path):
    config = config_of(tmp_path, data, num_models=4)
    first = run_attribute(config)
    scores = scores_of(first["run_dir"])
    store = RunStore(Path(first["run_dir"]) / "store")
    store.open("reflected_train", "r+")[2] = np.zeros(150, dtype=np.float32)
    shutil.rmtree(store.root / "output_changes" / "c" / "1", ignore_errors=True)
    again = run_attribute(config)
    assert again["trained_now"] == 0
    np.testing.assert_allclose(scores_of(again["run_dir"]), scores, rtol=1e-5, atol=1e-8)


def test_a_lost_copy_file_is_trained_again_and_said_so(harness, data, tmp_path, capsys):
    config = config_of(tmp_path, data, num_models=4)
    first = run_attribute(config)
    (Path(first["run_dir"]) / "copies" / "copy-000002.safetensors").unlink()
    again = run_attribute(config)
    assert (again["trained_now"], again["retrained_lost"], again["params_missing"]) == (1, [2], [])
    np.testing.assert_allclose(
        scores_of(again["run_dir"]), scores_of(first["run_dir"]), rtol=1e-5, atol=1e-8
    )


def test_scoring_another_way_reuses_the_copies(harness, data, tmp_path):
    subspace = run_attribute(config_of(tmp_path, data, num_models=4))
    other = config_of(tmp_path, data, name="cov.yaml", num_models=4, score="covariance")
    covariance = run_attribute(other)
    assert covariance["run_id"] == subspace["run_id"]
    assert covariance["trained_now"] == 0
    fresh = run_attribute(
        config_of(tmp_path, data, name="f.yaml", workspace="ws3", num_models=4, score="covariance")
    )
    np.testing.assert_allclose(
        scores_of(covariance["run_dir"]), scores_of(fresh["run_dir"]), rtol=1e-6
    )
    back = run_attribute(config_of(tmp_path, data, num_models=4))  # subspace again
    assert back["trained_now"] == 0
    assert not any(
        state == "Completed" for key, state in back["states"].items() if key.startswith("reflect")
    )


def test_group_size_does_not_change_the_scores(harness, data, tmp_path):
    one = run_attribute(config_of(tmp_path, data, num_models=5, group_size=5))
    other = run_attribute(
        config_of(tmp_path, data, name="b.yaml", workspace="ws2", num_models=5, group_size=2)
    )
    np.testing.assert_allclose(
        scores_of(one["run_dir"]), scores_of(other["run_dir"]), rtol=1e-4, atol=1e-7
    )


def test_subspace_is_refused_for_prompt_copies(tmp_path):
    path = tmp_path / "run.yaml"
    recipe = "{kind: prompt, base_url: 'http://127.0.0.1:9/v1', model: m}"
    path.write_text(
        "data: {train: {path: t.parquet}, queries: {path: q.parquet}}\n"
        f"model: {{access: prompt, recipe: {recipe}}}\n"
        "task: {kind: causal_lm}\n"
        "daunce: {score: subspace, objective: {access: black_box}, subset_ratio: 0.5}\n"
    )
    with pytest.raises(DaunceError, match=r"with model\.access: prompt the copies are prompts"):
        load_config(path, check_data=False)

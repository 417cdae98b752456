"""The LDS and subset-removal flows on real Prefect, real Zarr stores and real DuckDB files.

Each stored figure is checked against the library computing the same thing in memory (the
oracle): ground-truth retraining against `retrain_on_subsets`, the LDS against
`linear_datamodeling_score`, subset removal against `subset_removal`.
"""

import dataclasses

import numpy as np
import pytest
import yaml
import zarr
from pipeline_helpers import scores_of, write_config, write_data

from daunce_core import ClassificationTask
from daunce_core.access.torch_module.models import build_model
from daunce_core.errors import DaunceError
from daunce_core.evaluation.lds import lds_subsets, linear_datamodeling_score, retrain_on_subsets
from daunce_core.evaluation.removal import correct_queries, query_groups, subset_removal
from daunce_core.storage.lineage import Lineage, query_frame
from daunce_core.storage.zarr_store import OutcomeStore
from flows.cli import main
from flows.config import load_config
from flows.evaluate import run_lds, run_removal
from tasks.common import load_base_model, load_split

EVALUATION = {
    "baselines": ["gradient_dot"],
    "lds": {"subsets": 6, "seeds": 2, "group_size": 4},
    "removal": {"sizes": [5, 20], "seeds": 2, "per_group": 3, "max_groups": 2, "group_size": 8},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), n=120, m=20)


def _config(tmp_path, data, **evaluation):
    path = write_config(tmp_path / "run.yaml", tmp_path / "ws", data)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["train"]["epochs"] = 3
    raw["evaluation"] = EVALUATION | evaluation
    path.write_text(yaml.safe_dump(raw))
    return path


def _inputs(summary, config):
    """The canonical data and base model a run used, loaded as the tasks load them."""
    lineage = Lineage(config.workspace + "/lineage.duckdb")
    with lineage.connect(read_only=True) as con:
        rows = query_frame(
            con, "SELECT kind, uri, digest FROM artifacts WHERE run_id = ?", [summary["run_id"]]
        )
    found = {kind: (uri, digest) for kind, uri, digest in rows.iter_rows()}
    train = load_split(*found["data/train"])
    queries = load_split(*found["data/queries"])
    model = load_base_model(config.model.recipe, found["model/base"][0])
    return model, train, queries


def _make_model(config):
    return lambda s: build_model(config.model.recipe, seed=config.model.seed + s)


def test_lds_flow_matches_the_library_and_grows(harness, data, tmp_path, capsys, caplog):
    path = _config(tmp_path, data)
    config = load_config(path)
    first = run_lds(config)
    assert set(first["results"]) == {"daunce", "gradient_dot"}
    _, train, queries = _inputs(first, config)
    task = ClassificationTask()
    # Ground truth: the stored outcomes are the library's retraining of the same jobs.
    masks = lds_subsets(120, 6, 0.5, 0)
    expected = retrain_on_subsets(
        _make_model(config), task, train, queries, masks, config.model.train, seeds=2, l2=1e-3
    )
    stored = -OutcomeStore(first["truth_dir"]).outcomes()
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    # The LDS of DAUNCE's stored scores is the library's.
    lds = linear_datamodeling_score(scores_of(first["run_dir"]), masks, stored)
    assert first["results"]["daunce"]["mean"] == pytest.approx(lds.mean, abs=1e-9)
    assert first["results"]["daunce"]["stderr"] == pytest.approx(lds.stderr, abs=1e-9)

    # A rerun retrains nothing; a score file of the user's is evaluated beside the others.
    negated = tmp_path / "negated.npy"
    np.save(negated, -scores_of(first["run_dir"]))
    second = run_lds(
        dataclasses.replace(
            config,
            evaluation=dataclasses.replace(
                config.evaluation,
                scores=[*config.evaluation.scores, _score_file("negated", negated)],
            ),
        )
    )
    # Every retraining is done (its status in the truth store): no ground-truth task runs.
    assert not [k for k in second["states"] if k.startswith("ground-truth")]
    assert second["results"]["negated"]["mean"] == pytest.approx(-lds.mean, abs=1e-9)

    # M grows from 6 to 9: the first 6 subsets' outcomes are kept, only the new ones trained.
    caplog.clear()
    assert main(["lds", str(path), "--subsets", "9"]) == 0
    progress = [r.getMessage() for r in caplog.records if "ground truth:" in r.getMessage()]
    assert progress[-1:] == ["ground truth: 18/18 ready"]  # 6 new, none recounted
    store = OutcomeStore(first["truth_dir"])
    grown = -store.outcomes()
    assert grown.shape == (9, 2, 20)
    np.testing.assert_array_equal(grown[:6], stored)
    more = retrain_on_subsets(
        _make_model(config),
        task,
        train,
        queries,
        lds_subsets(120, 9, 0.5, 0),
        config.model.train,
        seeds=2,
        l2=1e-3,
    )
    np.testing.assert_allclose(grown[6:], more[6:], rtol=1e-5, atol=1e-6)

    # One SQL query compares the methods; baseline tables sit beside DAUNCE's.
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        latest = query_frame(
            con,
            "SELECT method, lds FROM lds_results WHERE subsets = 9 ORDER BY method",
        )
        methods = query_frame(con, "SELECT DISTINCT method FROM top_proponents ORDER BY method")[
            "method"
        ].to_list()
        evaluations = query_frame(
            con, "SELECT DISTINCT method FROM evaluations WHERE metric = 'lds/loss'"
        )
    assert latest["method"].to_list() == ["daunce", "gradient_dot"]
    assert methods == ["daunce", "gradient_dot"]
    assert set(evaluations["method"]) == {"daunce", "gradient_dot", "negated"}

    # `daunce top` lists one method's ranking (DAUNCE's unless told), not both interleaved.
    ws = ["--workspace", str(tmp_path / "ws"), "--run", first["run_id"]]
    expected_top = {
        method: np.argsort(-scores[:, 3], kind="stable")[:4].tolist()
        for method, scores in (
            ("daunce", scores_of(first["run_dir"])),
            ("gradient_dot", scores_of(first["run_dir"], "gradient_dot")),
        )
    }
    for method, args in (("daunce", []), ("gradient_dot", ["--method", "gradient_dot"])):
        capsys.readouterr()
        assert main(["top", "--query", "3", "-k", "4", *args, *ws]) == 0
        printed = capsys.readouterr().out
        assert f"by {method}" in printed
        cells = [line.split("┆") for line in printed.splitlines() if line.count("┆") > 2]
        ids = [int(c[1]) for c in cells if c[1].strip().isdigit()]
        assert ids == expected_top[method]
    assert main(["top", "--query", "3", "--method", "ekfac", *ws]) == 2
    assert "no ekfac scores (methods scored in it: daunce, gradient_dot)" in capsys.readouterr().err


def _score_file(name, path):
    from flows.config import ScoreFile

    return ScoreFile(name=name, path=str(path))


def test_a_killed_ground_truth_redoes_only_its_pending_jobs(harness, data, tmp_path):
    config = load_config(_config(tmp_path, data, baselines=[]))
    first = run_lds(config)
    store = OutcomeStore(first["truth_dir"])
    before = store.outcomes()
    # As if killed after writing some jobs: two jobs of the last group are pending again.
    status = zarr.open_array(store=str(store.root / "status"), mode="r+")
    status[5, 0] = 0
    status[5, 1] = 0
    again = run_lds(config)
    trained = {k: v for k, v in again["states"].items() if k.startswith("ground-truth")}
    assert sorted(trained.values()).count("Completed") == 1
    np.testing.assert_array_equal(store.outcomes(), before)


def test_bad_score_file_names_the_shape_and_keeps_the_truth(harness, data, tmp_path):
    path = _config(tmp_path, data, baselines=[])
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((7, 3)))
    assert main(["lds", str(path), "--scores", f"mine={bad}"]) == 2
    config = load_config(path)
    summary = run_lds(config)  # the ground truth computed before the error is reused
    assert not [k for k in summary["states"] if k.startswith("ground-truth")]
    with pytest.raises(DaunceError, match="unknown baseline"):
        load_config(_config(tmp_path, data, baselines=["no-such-method"]))


def test_removal_flow_matches_the_library(harness, data, tmp_path):
    config = load_config(_config(tmp_path, data))
    summary = run_removal(config)
    model, train, queries = _inputs(summary, config)
    task = ClassificationTask()
    settings = config.evaluation.removal
    groups = query_groups(
        correct_queries(model, task, queries),
        queries["y"].numpy(),
        max_per_group=settings.per_group,
        seed=settings.seed,
    )[: settings.max_groups]
    assert [g.tolist() for g in groups] == summary["groups"]
    expected = subset_removal(
        _make_model(config),
        task,
        train,
        queries,
        scores_of(summary["run_dir"]).astype(np.float64),
        config.model.train,
        groups=groups,
        sizes=settings.sizes,
        seeds=settings.seeds,
        random_trials=settings.random_trials,
        seed=settings.seed,
        share_random=settings.share_random,
        l2=config.model.l2,
    )
    table = {(r["method"], r["size"]): r for r in summary["table"]}
    for size, top, random in zip(expected.sizes, expected.top, expected.random, strict=True):
        assert table["daunce", int(size)]["mean"] == pytest.approx(top, nan_ok=True)
        assert table["random", int(size)]["mean"] == pytest.approx(random, nan_ok=True)
    assert ("gradient_dot", 20) in table
    # A rerun is served from the store; the results are queryable with SQL.
    again = run_removal(config)
    assert not [k for k in again["states"] if k.startswith("retrain")]
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        frame = query_frame(
            con, "SELECT method, size, mean FROM removal_results WHERE kind = 'top'"
        )
    assert set(frame["method"]) == {"daunce", "gradient_dot"}

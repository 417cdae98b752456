"""The API access kind through the attribute flow, against the local server in its own process.

Real HTTP on 127.0.0.1 (`tests/api_server.py` starts ``python -m daunce_core.access.api.server``
on a tiny GPT-2), the official ``openai`` client, real Prefect, Zarr and DuckDB. Covered: a run
end to end and served from the workspace afterwards; SIGKILL of the client mid-run and a resume
that creates no second job for any copy (jobs counted by the server); 429 and 500 storms the run
rides out; a wrong key, an unknown model, a server that is down and a job that fails for good,
each reported with the fix and nothing computed lost; the sampled-label form; refused settings.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from api_server import (
    make_tiny_model,
    records_of,
    start_server,
    write_instructions,
    write_run_config,
)
from pipeline_helpers import losses_of, scores_of
from test_resume import _env

from daunce_core.access.api.client import APIClient, APIUnavailable
from daunce_core.access.api.config import parse_api_recipe
from daunce_core.access.api.probes import ProbeSet
from daunce_core.errors import DaunceError
from daunce_core.method.subspace import subspace_scores
from daunce_core.storage.lineage import Lineage
from daunce_core.storage.zarr_store import RunStore
from flows.attribute import _api_label, run_attribute
from flows.config import load_config

N, M = 16, 4
KEY_ENV = "DAUNCE_TEST_API_KEY"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_instructions(tmp_path_factory.mktemp("api-data"), N, M, seed=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-server")
    model = make_tiny_model(folder / "tiny")
    with start_server(model, folder / "work", extra_args=["--model-id", "tiny"]) as running:
        yield running


@pytest.fixture(autouse=True)
def key(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, server.key)
    server.set_faults(
        rate_limit=0,
        error_rate=0,
        delay=0,
        fail_jobs=0,
        fail_first_jobs=0,
        step_delay=0,
        lose_job_replies=0,
    )


def api_config(tmp_path: Path, data: dict, server, name: str | None = None, **sections) -> Path:
    """A run configuration of K = 4 API copies of the tiny model (``sections`` replace).

    Each test's run gets its own name: the server outlives the tests, and a run adopts the
    jobs of its own name and copies that it finds there (as after a kill).
    """
    recipe = {
        "kind": "api",
        "base_url": server.base_url,
        "model": "tiny",
        "key_env": KEY_ENV,
        "fine_tune": {"n_epochs": 1, "batch_size": 4},
        "limits": {
            "poll_seconds": 0.1,
            "max_poll_seconds": 0.5,
            "backoff_seconds": 0.05,
            "max_backoff_seconds": 0.5,
            "requests_per_second": 200,
        },
    }
    model = {"access": "api", "recipe": recipe}
    if "recipe" in sections:
        recipe.update(sections.pop("recipe"))
    return write_run_config(tmp_path, data, name, "t", model, sections)


def jobs_by_suffix(server, run_id: str) -> dict[str, int]:
    counts = server.stats()["jobs_by_suffix"]
    return {suffix: n for suffix, n in counts.items() if suffix.startswith(run_id)}


def test_an_api_run_end_to_end_then_served_from_the_workspace(harness, data, server, tmp_path):
    config = load_config(api_config(tmp_path, data, server))
    first = run_attribute(config)
    assert first["trained_now"] == 4
    scores = scores_of(first["run_dir"])
    assert scores.shape == (N, M)
    assert np.isfinite(scores).all()
    train_losses, query_losses = losses_of(first["run_dir"])
    assert np.isfinite(train_losses).all()
    assert np.isfinite(query_losses).all()
    assert np.ptp(train_losses, axis=0).max() > 0  # the copies differ
    # Each copy: one job, recorded with its state and cost; its fine-tuned model id saved.
    run_id = _api_label(config)  # the prefix of its jobs' suffixes
    assert jobs_by_suffix(server, run_id) == {f"{run_id}-k{k}-a0": 1 for k in range(4)}
    for record in records_of(first["run_dir"], 4):
        assert record.status == "done"
        assert len(record.jobs) == 1
        assert record.job_state == "succeeded"
        assert record.usage["jobs"] == 1
        assert record.usage["trained_tokens"] > 0
        assert record.usage["prompt_tokens"] > 0  # the losses read
        saved = json.loads((Path(first["run_dir"]) / "copies" / record.params).read_text())
        assert saved["model"].startswith("ft:tiny:")
    # The key is nowhere in the workspace.
    assert len(list(Path(first["run_dir"]).glob("copies/copy-*.model.json"))) == 4
    for path in Path(tmp_path / "ws").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".parquet", ".duckdb", ".log"):
            assert server.key.encode() not in path.read_bytes(), path
    second = run_attribute(config)
    assert second["trained_now"] == 0
    np.testing.assert_array_equal(scores_of(second["run_dir"]), scores)
    assert jobs_by_suffix(server, run_id) == {f"{run_id}-k{k}-a0": 1 for k in range(4)}
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM top_proponents").fetchone()[0] == M * 3
    status = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    assert "fine-tuning jobs:" in status
    assert "succeeded" in status
    assert "trained_tokens" in status


def test_api_copies_are_the_in_process_copies_of_the_same_black_box_objective(
    harness, data, server, tmp_path
):
    """Through the API and in process, the same objective on the same model gives the same copies.

    Both runs fine-tune the tiny model with LoRA (rank 8, alpha 16: the server's defaults)
    initialised from the run's seed, on the same subsets (r = 0.5: 8 of 16 examples), with
    plain NLL of the completion and its end token, AdamW at lr 1e-3, one epoch of one batch
    (so the server's own shuffling cannot matter); losses include the end token on both sides
    (``end_text``). What remains is float32 rounding, with sums in another order (a padded
    batch on the server, the in-process trainer's rows): about 1e-6 on losses near 5 (measured
    here: 1e-6 on losses, 1e-4 of the largest score), while the copies move losses by ~0.015.
    Hence losses equal to 1e-5 and scores to 0.1% of the largest.
    """
    daunce = {
        "num_models": 4,
        "subset_ratio": 0.5,
        "objective": {"access": "black_box"},
        "score": "covariance",
    }
    recipe = {"fine_tune": {"n_epochs": 1, "batch_size": 8}, "end_text": "<|endoftext|>"}
    api = load_config(api_config(tmp_path / "api", data, server, daunce=daunce, recipe=recipe))
    through_api = run_attribute(api)
    folder = server.workdir.parent / "tiny"
    in_process = api_config(
        tmp_path / "local",
        data,
        server,
        daunce={
            **daunce,
            "train": {"optimizer": "adamw", "lr": 1e-3, "epochs": 1, "batch_size": 8},
        },
    )
    raw = yaml.safe_load(in_process.read_text())
    raw["model"] = {
        "access": "hf_lora",
        "recipe": {"kind": "pretrained", "path": str(folder), "lora": {"rank": 8, "alpha": 16}},
    }
    in_process.write_text(yaml.safe_dump(raw))
    local = run_attribute(load_config(in_process))
    api_train, api_query = losses_of(through_api["run_dir"])
    local_train, local_query = losses_of(local["run_dir"])
    moved = np.abs(local_train - local_train.mean(axis=0)).max()
    assert moved > 1e-2  # the copies differ, by far more than the tolerance
    np.testing.assert_allclose(api_train, local_train, atol=1e-5)
    np.testing.assert_allclose(api_query, local_query, atol=1e-5)
    api_scores, local_scores = scores_of(through_api["run_dir"]), scores_of(local["run_dir"])
    np.testing.assert_allclose(api_scores, local_scores, atol=1e-3 * np.abs(local_scores).max())


def test_sampled_labels_fine_tune_on_completions_drawn_from_the_base_model(
    harness, data, server, tmp_path
):
    daunce = {"num_models": 2, "subset_ratio": 1.0, "objective": {"labels": "sampled"}}
    recipe = {"sample_max_tokens": 6}  # prompt and sample fit the tiny model's 64 tokens
    config = load_config(api_config(tmp_path, data, server, daunce=daunce, recipe=recipe))
    result = run_attribute(config)
    assert result["trained_now"] == 2
    assert np.isfinite(scores_of(result["run_dir"])).all()
    # The files the server trained on hold sampled completions, not the observed ones.
    observed = {" " + c for c in pl.read_parquet(data["train"])["completion"]}
    client = server.client()
    sent = [f for f in client.files.list().data if f.filename.startswith(_api_label(config))]
    assert len(sent) == 2
    answers = [
        json.loads(line)["messages"][-1]["content"]
        for f in sent
        for line in client.files.content(f.id).text.splitlines()
    ]
    assert len(answers) == 2 * N
    assert sum(answer in observed for answer in answers) < N / 2
    for record in records_of(result["run_dir"], 2):
        assert record.usage["completion_tokens"] > 0  # completions were sampled


def test_sigkill_mid_run_then_resume_creates_no_second_job(data, server, tmp_path):
    server.set_faults(step_delay=0.05)  # jobs take a while: the kill lands while they run
    config = api_config(tmp_path, data, server, name="killed", daunce={"num_models": 6})
    loaded = load_config(config)
    run_id = _api_label(loaded)
    copies = tmp_path / "ws" / "runs" / loaded.run_id() / "copies"
    env = _env() | {KEY_ENV: server.key}  # the session's Prefect server: none starts
    command = [sys.executable, "-m", "flows.cli", "run", str(config)]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    started = time.monotonic()
    while time.monotonic() - started < 240 and proc.poll() is None:
        recorded = [
            r for r in copies.glob("copy-*.json") if json.loads(r.read_text()).get("job_id")
        ]
        if len(recorded) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    server.set_faults(step_delay=0)
    finished = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert jobs_by_suffix(server, run_id) == {f"{run_id}-k{k}-a0": 1 for k in range(6)}
    records = records_of(str(copies.parent), 6)
    assert all(r.status == "done" for r in records)
    # The killed process's jobs are in the records too: the cost adds up to the server's count.
    # Every job on the server is in the records: created (counted with its job id in one
    # write) or, if the kill fell between its creation and that write, adopted on resume.
    assert sum(r.usage["jobs"] + r.usage.get("adopted", 0) for r in records) == 6


def test_a_lost_copy_file_is_written_again_from_its_recorded_job(harness, data, server, tmp_path):
    config = load_config(api_config(tmp_path, data, server, daunce={"num_models": 2}))
    first = run_attribute(config)
    saved = Path(first["run_dir"]) / "copies" / "copy-000001.model.json"
    model = json.loads(saved.read_text())["model"]
    saved.write_text(saved.read_text()[:20])  # damaged
    more = tmp_path / "more.parquet"
    pl.read_parquet(data["queries"]).head(2).write_parquet(more)
    grown = load_config(
        api_config(tmp_path, data, server, name=config.name, daunce={"num_models": 2}),
        data={
            "train": {"path": str(data["train"])},
            "queries": [{"path": str(data["queries"])}, {"path": str(more)}],
        },
    )
    result = run_attribute(grown)  # new queries need the copies' models: found again
    assert json.loads(saved.read_text())["model"] == model
    assert result["trained_now"] == 0
    assert jobs_by_suffix(server, _api_label(config)) == {
        f"{_api_label(config)}-k{k}-a0": 1 for k in range(2)
    }


def test_429_and_500_storms_are_ridden_out(harness, data, server, tmp_path):
    server.set_faults(rate_limit=20, error_rate=0.3, fault_seed=3)
    daunce = {"num_models": 2}
    config = load_config(api_config(tmp_path, data, server, daunce=daunce))
    result = run_attribute(config)
    assert result["trained_now"] == 2
    assert np.isfinite(scores_of(result["run_dir"])).all()
    retries = sum(r.usage["retries"] for r in records_of(result["run_dir"], 2))
    assert retries > 0  # the faults were met, and retried
    answered = server.stats()["requests"].values()
    assert any(counts.get(code) for counts in answered for code in ("429", "500", "503"))


def test_a_lost_answer_to_a_job_creation_creates_no_second_job(harness, data, server, tmp_path):
    server.set_faults(lose_job_replies=2)  # created on the server, answered 500
    config = load_config(api_config(tmp_path, data, server, daunce={"num_models": 2}))
    result = run_attribute(config)
    assert result["trained_now"] == 2
    prefix = _api_label(config)
    assert jobs_by_suffix(server, prefix) == {f"{prefix}-k{k}-a0": 1 for k in range(2)}
    assert [len(r.jobs) for r in records_of(result["run_dir"], 2)] == [1, 1]


def test_a_failed_job_is_retried_as_a_new_job_and_every_attempt_recorded(
    harness, data, server, tmp_path
):
    server.set_faults(fail_first_jobs=1)
    config = load_config(api_config(tmp_path, data, server, daunce={"num_models": 2}))
    result = run_attribute(config)
    assert result["trained_now"] == 2
    attempts = sorted(len(r.jobs) for r in records_of(result["run_dir"], 2))
    assert attempts == [1, 2]


def test_a_job_that_fails_for_good_is_named_and_finished_copies_are_kept(
    harness, data, server, tmp_path
):
    limits = yaml.safe_load(api_config(tmp_path, data, server).read_text())["model"]["recipe"]
    limits = limits["limits"] | {"job_attempts": 1}
    path = api_config(
        tmp_path,
        data,
        server,
        recipe={"limits": limits},
        daunce={"num_models": 3},
        compute={"group_size": 3},
    )
    server.set_faults(fail_first_jobs=1)  # one copy of the group fails, the others succeed
    with pytest.raises(DaunceError, match=r"copy \d: 1 fine-tuning job\(s\) did not succeed"):
        run_attribute(load_config(path))
    run_dir = next((tmp_path / "ws").glob("runs/*"))
    records = records_of(str(run_dir), 3)
    assert sorted(r.status for r in records) == ["done", "done", "training"]
    failed = next(r for r in records if r.status == "training")
    assert failed.job_state.startswith("failed")
    kept = {r.k: r.finished_at for r in records if r.status == "done"}
    raised = yaml.safe_load(path.read_text())
    raised["model"]["recipe"]["limits"]["job_attempts"] = 2
    path.write_text(yaml.safe_dump(raised))
    result = run_attribute(load_config(path))
    assert result["trained_now"] == 1
    after = records_of(result["run_dir"], 3)
    assert len(after[failed.k].jobs) == 2
    assert {k: after[k].finished_at for k in kept} == kept  # not trained again


def test_a_training_file_the_server_refuses_is_not_retried(harness, data, server, tmp_path):
    daunce = {"num_models": 2, "subset_ratio": 1.0, "objective": {"labels": "sampled"}}
    recipe = {"sample_max_tokens": 200}  # longer than the tiny model's context window
    config = load_config(api_config(tmp_path, data, server, daunce=daunce, recipe=recipe))
    with pytest.raises(DaunceError, match=r"refused its training file .*context window"):
        run_attribute(config)
    run_dir = next((tmp_path / "ws").glob("runs/*"))
    assert [len(r.jobs) for r in records_of(str(run_dir), 2)] == [1, 1]


def test_a_wrong_key_an_unknown_model_and_a_down_server_are_named(
    harness, data, server, tmp_path, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    with pytest.raises(DaunceError, match=rf"refused the API key.*{KEY_ENV}"):
        run_attribute(load_config(api_config(tmp_path / "a", data, server)))
    monkeypatch.setenv(KEY_ENV, server.key)
    wrong = api_config(tmp_path / "b", data, server, recipe={"model": "gpt-17"})
    with pytest.raises(DaunceError, match=r"no model 'gpt-17'; it serves \[.*'tiny'"):
        run_attribute(load_config(wrong))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(DaunceError, match=rf"environment variable {KEY_ENV}.*not set"):
        run_attribute(load_config(api_config(tmp_path / "c", data, server)))


def test_a_base_url_without_v1_is_named(server):
    recipe = parse_api_recipe({"base_url": server.root_url, "model": "tiny"})
    with pytest.raises(DaunceError, match=r"answers 404 for /models.*ends in /v1"):
        APIClient(recipe, server.key).check_model("tiny")


def test_a_server_that_is_down_is_named_with_the_fix():
    recipe = parse_api_recipe(
        {
            "base_url": "http://127.0.0.1:9/v1",
            "model": "tiny",
            "limits": {"backoff_seconds": 0.01, "timeout_seconds": 2},
        }
    )
    waits: list[float] = []
    client = APIClient(recipe, "key", sleep=waits.append)
    with pytest.raises(APIUnavailable, match=r"nothing usable answers at .*start the server"):
        client.check_model("tiny")
    assert len(waits) == 2  # two retries, then the error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"recipe": {"key": "sk-123"}}, r"must not hold the API key"),
        ({"recipe": {"base_url": "ftp://x"}}, r"base_url must be an http"),
        ({"recipe": {"base_url": "http://user:pw@host/v1"}}, r"must not carry credentials"),
        ({"recipe": {"loss": "guess"}}, r"loss must be one of"),
        ({"recipe": {"fine_tune": {"n_epochs": 0}}}, r"n_epochs .* must be >= 1"),
        ({"recipe": {"limits": {"jobs_in_flight": 0}}}, r"jobs_in_flight must be >= 1"),
        ({"daunce": {"objective": {"access": "white_box"}}}, r"'api' model cannot run"),
        (
            {"daunce": {"objective": {"access": "black_box", "variant": "efim"}}},
            r"custom_objective",
        ),
        ({"daunce": {"train": {"lr": 0.1}}}, r"daunce.train does not apply"),
        ({"model": {"access": "api", "train": {"lr": 0.1}}}, r"model.train does not apply"),
        ({"daunce": {"subset_ratio": 1.0}}, r"subset_ratio=1 every copy is the same"),
        ({"task": {"kind": "classification"}}, r"needs task.kind: causal_lm"),
    ],
)
def test_bad_api_configurations_are_refused_at_load(data, server, tmp_path, change, message):
    with pytest.raises(DaunceError, match=message):
        load_config(api_config(tmp_path, data, server, **change))


def test_limits_and_the_key_variable_do_not_change_the_run(data, server, tmp_path):
    one = load_config(api_config(tmp_path, data, server, name="api"))
    other = api_config(
        tmp_path,
        data,
        server,
        name="api",
        recipe={"key_env": "OTHER_KEY", "limits": {"jobs_in_flight": 1}},
    )
    assert load_config(other).run_id() == one.run_id()
    epochs = api_config(tmp_path, data, server, "api", recipe={"fine_tune": {"n_epochs": 2}})
    assert load_config(epochs).run_id() != one.run_id()


def test_one_sided_subspace_scores_of_api_copies(harness, data, server, tmp_path):
    """API copies cannot be reflected: A = L(θ^k) − L(θ0), Q from probes sampled from θ0.

    The scores equal ``(1/n) Aᵀ Q⁺ B`` formed here from the stored loss rows, θ0's losses and
    each copy's factors on the probes (``Q = F Fᵀ / n_c``); a rerun samples and measures nothing
    again.
    """
    daunce = {
        "num_models": 4,
        "subset_ratio": 0.5,
        "objective": {"access": "black_box"},
        "score": "subspace",
    }
    recipe = {"sample_max_tokens": 6}  # prompt and sample fit the tiny model's 64 tokens
    config = load_config(api_config(tmp_path, data, server, daunce=daunce, recipe=recipe))
    first = run_attribute(config)
    assert first["reflected_now"] == [0, 1, 2, 3]
    run_dir = Path(first["run_dir"])
    probes = ProbeSet.read(run_dir / "store" / "probes.json", N)
    assert len(probes.rows) == N
    assert probes.used.sum() > N / 2  # most samples have tokens
    train, query = losses_of(run_dir)
    factors = np.asarray(RunStore(run_dir / "store").open("output_changes"))
    assert factors.shape == (4, N)
    expected = subspace_scores(
        train - np.asarray(probes.train),
        query - np.asarray(probes.query),
        factors.astype(np.float64) @ factors.T.astype(np.float64) / N,
    )
    scores = scores_of(run_dir)
    # float32 rows: the stand-ins 2 L(θ0) − L(θ^k) round at about 1e-7 of the losses (~5)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    kept = (run_dir / "store" / "probes.json").read_bytes()
    again = run_attribute(config)
    assert all(state == "Cached" for key, state in again["states"].items() if "reflect" in key)
    assert (run_dir / "store" / "probes.json").read_bytes() == kept
    np.testing.assert_array_equal(scores_of(run_dir), scores)
    # Probes altered by hand (valid JSON, other values) are not used: they are made again (the
    # local server samples the same completions from the same seed, so no copy needs measuring
    # again); probes that came out otherwise would send every copy to be measured again.
    altered = json.loads(kept)
    altered["probe"][0] += 0.5
    (run_dir / "store" / "probes.json").write_text(json.dumps(altered))
    third = run_attribute(config)
    assert (run_dir / "store" / "probes.json").read_bytes() == kept
    assert third["reflected_now"] == []
    np.testing.assert_allclose(scores_of(run_dir), scores, rtol=1e-5, atol=1e-7)

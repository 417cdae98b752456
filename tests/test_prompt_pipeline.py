"""Strict black-box access (``model.access: prompt``): copies learned as prompts over loss queries.

Real HTTP on 127.0.0.1 (`tests/api_server.py`: the local OpenAI-compatible server on a tiny
GPT-2), real Prefect, Zarr and DuckDB. Covered: the search's pieces against what they must be
(simplex projection's optimality conditions, the policy gradient's expectation, a separable
objective's minimum found); a run end to end, rerun without work; the budget bounds each
copy's calls and tokens; SIGKILL mid-search, then a resume that repeats no finished copy,
continues the killed copies from their saved step and ends with the rows of an uninterrupted
run; the sampled-label form; configurations that ask to fine-tune or use gradients refused.
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
from api_server import (
    make_tiny_model,
    records_of,
    start_server,
    write_instructions,
    write_run_config,
)
from pipeline_helpers import losses_of, scores_of
from test_resume import _env

from daunce_core.access.api.access import TextExamples
from daunce_core.access.api.client import APIClient
from daunce_core.access.base import CopiesFailed
from daunce_core.access.prompt.access import PromptAccess
from daunce_core.access.prompt.config import Budget, PromptSearch, parse_prompt_recipe
from daunce_core.access.prompt.search import (
    PolicyState,
    adamw_step,
    mine_candidates,
    policy_gradient,
    project_simplex,
    sample_prompts,
)
from daunce_core.errors import DaunceError
from daunce_core.method.config import DaunceConfig
from daunce_core.method.objectives import Objective
from daunce_core.storage.lineage import Lineage
from flows.attribute import run_attribute
from flows.config import load_config

N, M = 16, 4
KEY_ENV = "DAUNCE_TEST_PROMPT_KEY"
REPO = Path(__file__).resolve().parents[1]
SEARCH = {"length": 2, "candidates": 8, "samples": 2, "batch_size": 4, "steps": 4}


# The search's pieces ----------------------------------------------------------------------


def test_simplex_projection_meets_its_optimality_conditions():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 7)) * rng.uniform(0.1, 5, size=(50, 1))
    projected = project_simplex(rows)
    np.testing.assert_allclose(projected.sum(axis=1), 1.0, atol=1e-12)
    assert (projected >= 0).all()
    for x, p in zip(rows, projected, strict=True):
        # KKT: p = max(x − θ, 0) with one θ; zero entries have x ≤ θ.
        theta = (x - p)[p > 0]
        np.testing.assert_allclose(theta, theta[0], atol=1e-12)
        assert (x[p == 0] <= theta[0] + 1e-12).all()
    on_simplex = np.array([[0.2, 0.3, 0.5]])
    np.testing.assert_allclose(project_simplex(on_simplex), on_simplex)


def test_the_policy_gradient_is_the_gradient_of_the_expected_objective():
    """For one position, E[g_j] = F(j) − E[F] (the gradient of Σ_j p_j F(j), centred)."""
    rng = np.random.default_rng(1)
    probs = np.array([[0.1, 0.2, 0.3, 0.4]])
    values_of = np.array([3.0, -1.0, 0.5, 2.0])
    total = np.zeros_like(probs)
    draws = 20_000
    for _ in range(draws):
        chosen = sample_prompts(probs, 4, rng)
        total += policy_gradient(probs, chosen, values_of[chosen[:, 0]])
    expected = values_of - probs[0] @ values_of
    np.testing.assert_allclose(total[0] / draws, expected, atol=0.1)


def test_the_search_finds_the_minimum_of_a_separable_objective():
    rng = np.random.default_rng(2)
    cost = rng.random((3, 10))
    cost[np.arange(3), rng.integers(0, 10, size=3)] -= 0.3  # one clear minimum per position
    state = PolicyState.start(3, 10)
    for _ in range(300):
        chosen = sample_prompts(state.probs, 4, rng)
        values = cost[np.arange(3), chosen].sum(axis=1)
        adamw_step(state, policy_gradient(state.probs, chosen, values), 0.05, 0.0, 10.0)
    np.testing.assert_array_equal(state.best(), cost.argmin(axis=1))
    np.testing.assert_allclose(state.probs.sum(axis=1), 1.0)
    again = PolicyState.from_dict(json.loads(json.dumps(state.as_dict())))
    np.testing.assert_array_equal(again.probs, state.probs)  # a saved state is exact


def test_candidates_are_frequent_phrases_in_a_fixed_order():
    texts = ["the cat sat", "the dog sat", "a cat ran", "a bird flew"]
    assert mine_candidates(texts, 3, 2) == mine_candidates(list(reversed(texts)), 3, 2)
    assert set(mine_candidates(texts, 10, 1)) == {"the", "cat", "sat", "a"}
    with pytest.raises(DaunceError, match=r"must share some words"):
        mine_candidates(["one two", "three four"], 5, 1)


# Against the server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_instructions(tmp_path_factory.mktemp("prompt-data"), N, M, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt-server")
    model = make_tiny_model(folder / "tiny", context=128)
    with start_server(model, folder / "work", extra_args=["--model-id", "tiny"]) as running:
        yield running


@pytest.fixture(autouse=True)
def key(request, monkeypatch):
    if "server" not in request.fixturenames:
        return
    server = request.getfixturevalue("server")
    monkeypatch.setenv(KEY_ENV, server.key)
    server.set_faults(rate_limit=0, error_rate=0, delay=0)


def recipe_of(server, **fields) -> dict:
    recipe = {
        "kind": "prompt",
        "base_url": server.base_url,
        "model": "tiny",
        "key_env": KEY_ENV,
        "loss": "echo",
        "search": dict(SEARCH),
        "limits": {"backoff_seconds": 0.05, "requests_per_second": 500},
    }
    for name, value in fields.items():
        recipe[name] = {**recipe.get(name, {}), **value} if isinstance(value, dict) else value
    return recipe


def prompt_config(tmp_path: Path, data: dict, server, name: str | None = None, **sections):
    """A run configuration of K = 4 prompt copies of the tiny model (``sections`` replace)."""
    recipe = recipe_of(server, **sections.pop("recipe", {}))
    return write_run_config(
        tmp_path, data, name, "p", {"access": "prompt", "recipe": recipe}, sections
    )


def test_a_prompt_run_end_to_end_then_rerun_without_work(harness, data, server, tmp_path):
    config = load_config(prompt_config(tmp_path, data, server))
    first = run_attribute(config)
    assert first["trained_now"] == 4
    scores = scores_of(first["run_dir"])
    assert scores.shape == (N, M)
    assert np.isfinite(scores).all()
    train_losses, _ = losses_of(first["run_dir"])
    assert np.ptp(train_losses, axis=0).max() > 0  # the copies' prompts differ
    per_step = 2 * 4  # loss queries: 2 prompts × 4 examples (one request)
    for record in records_of(first["run_dir"], 4):
        assert record.status == "done"
        assert record.job_state.startswith("stopped by steps: step 4/4")
        # One request per search step, then one per split to measure the copy.
        assert record.usage["requests"] == 4 + 2
        assert record.usage["prompt_tokens"] > 0
        saved = json.loads((Path(first["run_dir"]) / "copies" / record.params).read_text())
        assert saved["steps"] == 4
        assert saved["calls"] == 4 * per_step
        assert saved["prompt"] == " ".join(saved["phrases"]) + "\n"
    second = run_attribute(config)
    assert second["trained_now"] == 0
    np.testing.assert_array_equal(scores_of(second["run_dir"]), scores)
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        rows = con.execute(
            "SELECT count(*), sum(search_calls), min(search_tokens), sum(jobs_created) "
            "FROM copies WHERE run_id = ?",
            [config.run_id()],
        ).fetchone()
    assert rows[0] == 4
    assert rows[1] == 4 * 4 * per_step  # the budget's count, once per copy
    assert rows[2] > 0
    assert rows[3] == 0
    status = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    assert "prompt searches:" in status
    assert "stopped by steps" in status


def _access(server, data, budget: Budget, steps: int = 12) -> PromptAccess:
    recipe = parse_prompt_recipe(recipe_of(server))
    train = pl.read_parquet(data["train"]).to_dict(as_series=False)
    queries = pl.read_parquet(data["queries"]).to_dict(as_series=False)
    task = {"kind": "causal_lm"}
    return PromptAccess(
        APIClient(recipe.server, server.key),
        "tiny",
        "echo",
        TextExamples.from_columns(task, train, "train"),
        TextExamples.from_columns(task, queries, "queries"),
        DaunceConfig(num_models=2, subset_ratio=0.5, objective=Objective(access="black_box")),
        PromptSearch(**{**SEARCH, "steps": steps}),
        budget,
    )


def test_the_budget_bounds_each_copys_calls_and_tokens(data, server):
    by_calls = _access(server, data, Budget(calls=5 * 8 + 7)).train([0])  # 8 queries a step
    assert by_calls.stopped == ["budget.calls"]
    assert by_calls.states[0].calls == 5 * 8
    assert by_calls.states[0].step == 5
    unbounded = _access(server, data, Budget()).train([0])
    assert unbounded.stopped == ["steps"]
    assert unbounded.states[0].step == 12
    tokens = unbounded.states[0].tokens
    by_tokens = _access(server, data, Budget(tokens=tokens // 2)).train([0])
    assert by_tokens.stopped == ["budget.tokens"]
    assert 0 < by_tokens.states[0].tokens <= tokens // 2
    # The same copy, however far it got: its first steps are the unbounded copy's.
    assert (
        by_tokens.states[0].objective == unbounded.states[0].objective[: by_tokens.states[0].step]
    )
    with pytest.raises(CopiesFailed, match=r"budget\.tokens=10 cannot pay for one search step"):
        _access(server, data, Budget(tokens=10)).train([1])


def test_sigkill_mid_search_then_resume_repeats_no_finished_copy(harness, data, server, tmp_path):
    """The resumed run continues killed searches from their saved step and ends as if never
    killed: its loss rows are an uninterrupted run's (the server's losses are deterministic)."""
    recipe = {"search": {"steps": 10}}
    daunce = {"num_models": 6}
    reference = run_attribute(
        load_config(
            prompt_config(tmp_path / "ref", data, server, "ref", recipe=recipe, daunce=daunce)
        )
    )
    server.set_faults(delay=0.05)  # each request a little slow: the kill lands mid-search
    config = prompt_config(
        tmp_path / "killed", data, server, "killed", recipe=recipe, daunce=daunce
    )
    copies = tmp_path / "killed" / "ws" / "runs" / load_config(config).run_id() / "copies"
    env = _env() | {KEY_ENV: server.key}
    command = [sys.executable, "-m", "flows.cli", "run", str(config)]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    started = time.monotonic()
    while time.monotonic() - started < 240 and proc.poll() is None:
        done = [p for p in copies.glob("copy-*.json") if '"done"' in p.read_text()]
        midway = [
            p
            for p in copies.glob("copy-*.state.json")
            if 3 <= json.loads(p.read_text())["state"]["step"] < 10
        ]
        if done and midway:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = {r.k: r for r in records_of(str(copies.parent), 6)}
    server.set_faults(delay=0)
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming its search at step" in finished.stdout
    after = records_of(str(copies.parent), 6)
    assert all(r.status == "done" for r in after)
    for record in after:
        if before[record.k].status == "done":  # finished before the kill: not repeated
            assert record.attempts == 1
            assert record.finished_at == before[record.k].finished_at
    train, query = losses_of(str(copies.parent))
    ref_train, ref_query = losses_of(reference["run_dir"])
    np.testing.assert_allclose(train, ref_train, rtol=0, atol=1e-6)
    np.testing.assert_allclose(query, ref_query, rtol=0, atol=1e-6)


def test_sampled_labels_search_on_completions_drawn_from_the_base_model(
    harness, data, server, tmp_path
):
    daunce = {"num_models": 2, "subset_ratio": 1.0, "objective": {"labels": "sampled"}}
    recipe = {"sample_max_tokens": 6, "end_text": "<|endoftext|>"}
    config = load_config(prompt_config(tmp_path, data, server, daunce=daunce, recipe=recipe))
    result = run_attribute(config)
    assert result["trained_now"] == 2
    assert np.isfinite(scores_of(result["run_dir"])).all()
    observed = {" " + c for c in pl.read_parquet(data["train"])["completion"]}
    for k, record in enumerate(records_of(result["run_dir"], 2)):
        assert record.usage["completion_tokens"] > 0  # completions were sampled
        state = json.loads(
            (Path(result["run_dir"]) / "copies" / f"copy-{k:06d}.state.json").read_text()
        )
        assert sum(c in observed for c in state["completions"]) < N / 2


def test_a_prompt_too_long_for_the_context_is_refused_before_any_search(
    harness, data, server, tmp_path
):
    recipe = {"search": {"length": 30, "max_words": 2}}
    config = load_config(prompt_config(tmp_path, data, server, recipe=recipe))
    with pytest.raises(DaunceError, match=r"Lower model\.recipe\.search\.length"):
        run_attribute(config)
    assert not list((tmp_path / "ws").rglob("copy-*.state.json"))  # no search began


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"recipe": {"fine_tune": {"n_epochs": 1}}}, r"never fine-tunes .* model.access: api"),
        ({"recipe": {"gradients": True}}, r"reads no gradients"),
        (
            {"daunce": {"objective": {"access": "white_box"}}},
            r"'prompt' model cannot run.*gradients",
        ),
        ({"daunce": {"objective": {"access": "black_box", "variant": "trak"}}}, r"variant 'trak'"),
        ({"daunce": {"train": {"lr": 0.1}}}, r"daunce.train does not apply .* model.recipe.search"),
        ({"model": {"access": "prompt", "train": {"lr": 0.1}}}, r"model.train does not apply"),
        ({"daunce": {"prox": 0.1}}, r"daunce.prox cannot apply to model.access: prompt"),
        ({"recipe": {"search": {"samples": 1}}}, r"search.samples must be >= 2"),
        ({"recipe": {"search": {"learning_rate": 0}}}, r"search.learning_rate must be > 0"),
        ({"recipe": {"budget": {"calls": 0}}}, r"budget.calls must be >= 1"),
        ({"recipe": {"budget": {"calls": 7}}}, r"budget.calls=7 cannot pay for one search step"),
        ({"recipe": {"key": "sk-1"}}, r"must not hold the API key"),
        ({"task": {"kind": "classification"}}, r"model.access: prompt needs task.kind: causal_lm"),
    ],
)
def test_configurations_asking_to_fine_tune_or_for_gradients_are_refused(
    data, server, tmp_path, change, message
):
    with pytest.raises(DaunceError, match=message):
        load_config(prompt_config(tmp_path, data, server, **change))


def test_a_recipe_without_its_kind_reaches_the_server_as_a_prompt_recipe(server, monkeypatch):
    from tasks.common import api_client

    recipe = {k: v for k, v in recipe_of(server).items() if k != "kind"}
    assert api_client(recipe, "prompt").recipe.base_url == server.base_url


def test_perturbation_knobs_a_prompt_search_ignores_are_refused_in_the_library(data, server):
    access = _access(server, data, Budget())
    black_box = Objective(access="black_box")
    for change in (
        {"antithetic": True},
        {"prox": 0.1},
        {"objective": Objective(access="black_box", rho=0.5)},
    ):
        config = DaunceConfig(
            **{"num_models": 2, "subset_ratio": 0.5, "objective": black_box} | change
        )
        with pytest.raises(DaunceError, match=r"cannot apply to model\.access: prompt"):
            PromptAccess(access.client, "tiny", "echo", access.train_set, access.query_set, config)


def test_limits_and_checkpointing_do_not_change_the_run_but_the_search_does(data, server, tmp_path):
    one = load_config(prompt_config(tmp_path, data, server, "p"))
    same = prompt_config(
        tmp_path,
        data,
        server,
        "p",
        recipe={"limits": {"retries": 2}, "search": {"checkpoint_steps": 3}},
    )
    assert load_config(same).run_id() == one.run_id()
    longer = prompt_config(tmp_path, data, server, "p", recipe={"search": {"steps": 5}})
    assert load_config(longer).run_id() != one.run_id()
    bounded = prompt_config(tmp_path, data, server, "p", recipe={"budget": {"calls": 90}})
    assert load_config(bounded).run_id() != one.run_id()

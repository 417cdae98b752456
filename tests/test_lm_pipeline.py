"""Language models through the attribute flow: a tiny causal LM and a tiny classifier, end to end.

Real Prefect (the session's server), real Zarr stores and DuckDB files, models built from config
with a tokenizer trained on the data (no downloads). Also: SIGKILL mid-run and resume, and the
configuration errors a language-model run refuses before anything trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from pipeline_helpers import losses_of, scores_of
from test_resume import _kill_when, _run_to_end

from daunce_core.access.hf_lora.access import HFLoraAccess
from daunce_core.access.hf_lora.models import LoraSpec, load_model
from daunce_core.errors import DaunceError
from daunce_core.evaluation.instructions import corpus, instructions
from daunce_core.method.subspace import subspace_scores
from daunce_core.storage.lineage import Lineage
from daunce_core.storage.zarr_store import OutcomeStore, RunStore
from flows.attribute import run_attribute
from flows.config import load_config
from flows.evaluate import run_lds, run_removal

N, M, K = 48, 12, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Instruction data (train, queries) as Parquet, and a small pretraining corpus."""
    folder = tmp_path_factory.mktemp("lm-data")
    train, queries = instructions(num_train=N, num_queries=M, seed=1)
    paths = {"train": folder / "train.parquet", "queries": folder / "queries.parquet"}
    pl.DataFrame(train).write_parquet(paths["train"])
    pl.DataFrame(queries).write_parquet(paths["queries"])
    paths["corpus"] = folder / "corpus.txt"
    paths["corpus"].write_text("\n".join(corpus(200, seed=1)))
    return paths


def lm_config(tmp_path: Path, data: dict, kind: str = "causal_lm", **sections) -> Path:
    """A run configuration of a one-layer GPT-2 with LoRA copies (``sections`` replace)."""
    task = {"kind": kind, "prompt": "prompt", "completion": "completion"}
    if kind == "sequence_classification":
        task = {"kind": kind, "text": "prompt", "label": "skill_id"}
    config = {
        "name": "lm",
        "workspace": str(tmp_path / "ws"),
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "task": task,
        "model": {
            "access": "hf_lora",
            "recipe": {
                "kind": "gpt2",
                "layers": 1,
                "width": 32,
                "heads": 2,
                "context": 48,
                "vocab": 320,
                "corpus": str(data["corpus"]),
                "pretrain_steps": 10,
                "pretrain_batch": 8,
                "lora": {"rank": 4, "alpha": 8},
            },
            "train": {"optimizer": "adamw", "lr": 0.01, "epochs": 1, "batch_size": 16},
        },
        "daunce": {"num_models": K, "train": {"lr": 0.001, "epochs": 1, "batch_size": 16}},
        "compute": {"group_size": 2},
        "exports": {"top_k": 3},
        "execution": {"workers": 2, "retries": 0},
    } | sections
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_causal_lm_end_to_end_then_served_from_the_workspace(harness, data, tmp_path):
    config = load_config(lm_config(tmp_path, data))
    first = run_attribute(config)
    assert first["trained_now"] == K
    assert (first["num_train"], first["num_queries"]) == (N, M)
    scores = scores_of(first["run_dir"])
    assert scores.shape == (N, M)
    assert np.isfinite(scores).all()
    train_losses, query_losses = losses_of(first["run_dir"])
    assert train_losses.shape == (K, N)
    assert np.isfinite(query_losses).all()
    assert np.ptp(train_losses, axis=0).max() > 0  # the copies differ
    # θ0 is a model folder next to the model it was fine-tuned from.
    theta0 = next((tmp_path / "ws").glob("models/*/theta0"))
    assert (theta0.parent / "pretrained" / "config.json").exists()
    model, tokenizer = load_model(theta0, "causal_lm")
    assert tokenizer.pad_token_id is not None
    assert model.config.n_layer == 1
    # Each copy's adapter is saved (safetensors) with its digest in its record.
    records = sorted(Path(first["run_dir"]).glob("copies/copy-*.json"))
    assert len(records) == K
    adapters = sorted(Path(first["run_dir"]).glob("copies/*.safetensors"))
    assert len(adapters) == K
    # The base model's quality: loss and greedy exact-match accuracy per example.
    assert {"base/train_loss", "base/query_accuracy"} <= set(first["base_model"]["metrics"])
    second = run_attribute(config)
    assert second["trained_now"] == 0
    assert set(second["states"].values()) == {"Cached"}
    np.testing.assert_array_equal(scores_of(second["run_dir"]), scores)
    # The prompts are in SQL beside the scores.
    with Lineage(tmp_path / "ws" / "lineage.duckdb").connect(read_only=True) as con:
        count = con.execute("SELECT count(*) FROM top_proponents").fetchone()[0]
    assert count == M * 3


def test_a_sequence_classifier_end_to_end(harness, data, tmp_path):
    config = load_config(lm_config(tmp_path, data, kind="sequence_classification"))
    result = run_attribute(config)
    assert result["trained_now"] == K
    assert scores_of(result["run_dir"]).shape == (N, M)
    assert "base/train_accuracy" in result["base_model"]["metrics"]


@pytest.mark.slow  # ~50 s; `make test` keeps SIGKILL + resume of LM copies in the contract
# tests (tests/test_access_hf.py) and of the flow in tests/test_resume.py (torch)
def test_sigkill_then_resume_gives_the_scores_of_an_uninterrupted_run(data, tmp_path):
    slow = {"daunce": {"num_models": 6, "train": {"lr": 0.001, "epochs": 2, "batch_size": 8}}}
    (tmp_path / "killed").mkdir()
    config = lm_config(tmp_path / "killed", data, **slow)
    workspace = tmp_path / "killed" / "ws"
    done = _kill_when(config, workspace, lambda finished, t: finished >= 2, timeout=600)
    assert 2 <= done < 6
    finished = _run_to_end(config)
    assert f"{6 - done} copies trained now" in finished.stdout
    (tmp_path / "clean").mkdir()
    reference = lm_config(tmp_path / "clean", data, **slow)
    _run_to_end(reference)
    resumed = next(workspace.glob("runs/*"))
    clean = next((tmp_path / "clean" / "ws").glob("runs/*"))
    np.testing.assert_array_equal(scores_of(str(resumed)), scores_of(str(clean)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": {"kind": "causal_lm", "prompt": "nope"}}, r"task.prompt is 'nope'"),
        ({"task": {"kind": "causal_lm", "prompt": "skill_id"}}, r"not text"),
        ({"task": {"kind": "classification"}}, r"does not go with model.access 'hf_lora'"),
        ({"model": {"access": "hf_lora", "recipe": {"kind": "bert"}}}, r"'gpt2'.*'pretrained'"),
        (
            {"model": {"access": "hf_lora", "recipe": {"kind": "gpt2", "corpus": "missing.txt"}}},
            r"model.recipe.corpus .* does not exist",
        ),
        (
            {"model": {"access": "hf_lora", "recipe": {"kind": "pretrained", "path": "nowhere"}}},
            r"model.recipe.path .* does not exist",
        ),
        (
            {"model": {"access": "hf_lora", "recipe": {"kind": "gpt2", "lora": {"rank": 0}}}},
            r"lora.rank must be a positive integer",
        ),
        (
            {"model": {"access": "hf_lora", "recipe": {"kind": "gpt2", "layer": 2}}},
            r"unknown field\(s\) \['model.recipe.layer'\]",
        ),
    ],
)
def test_bad_language_model_configurations_are_refused_at_load(data, tmp_path, change, message):
    with pytest.raises(DaunceError, match=message):
        load_config(lm_config(tmp_path, data, **change))


def test_a_missing_lora_target_module_is_refused_before_any_copy_trains(harness, data, tmp_path):
    recipe = yaml.safe_load(lm_config(tmp_path, data).read_text())["model"]
    recipe["recipe"]["lora"]["target_modules"] = ["q_proj"]
    config = load_config(lm_config(tmp_path, data, model=recipe))
    with pytest.raises(DaunceError, match=r"target_modules names \['q_proj'\]"):
        run_attribute(config)
    assert not list((tmp_path / "ws").glob("runs/*/copies/*.safetensors"))
    assert not list((tmp_path / "ws").glob("models/*/theta0"))


def test_lds_and_subset_removal_on_a_language_model(harness, data, tmp_path):
    evaluation = {
        "baselines": ["gradient_dot", "trak", "ekfac"],
        "lds": {"subsets": 4, "seeds": 1, "group_size": 2},
        "removal": {"sizes": [4], "seeds": 1, "group_by": "skill_id", "per_group": 2},
    }
    config = load_config(lm_config(tmp_path, data, evaluation=evaluation))
    lds = run_lds(config)
    assert set(lds["results"]) == {"daunce", "gradient_dot", "trak", "ekfac"}
    truth = OutcomeStore(lds["truth_dir"]).outcomes()
    assert truth.shape == (4, 1, M)
    assert np.isfinite(truth).all()
    assert np.ptp(truth, axis=0).max() > 0  # subsets give different fine-tunings
    again = run_lds(config)  # the ground truth is reused
    assert not [k for k in again["states"] if k.startswith("ground-truth")]


def test_subset_removal_counts_greedy_answers_that_turn_wrong(harness, data, tmp_path):
    # Queries the model has memorised (training prompts), so that it answers them correctly.
    queries = tmp_path / "memorised.parquet"
    pl.read_parquet(data["train"]).head(M).write_parquet(queries)
    memorise = {"optimizer": "adamw", "lr": 0.01, "epochs": 30, "batch_size": 16}
    path = lm_config(
        tmp_path,
        data,
        evaluation={
            "removal": {
                "sizes": [4],
                "seeds": 1,
                "group_by": "skill_id",
                "per_group": 2,
                "random_trials": 1,
            }
        },
    )
    raw = yaml.safe_load(path.read_text())
    raw["data"]["queries"]["path"] = str(queries)
    raw["model"]["train"] = memorise
    raw["model"]["recipe"] |= {"pretrain_steps": 600, "pretrain_batch": 16, "lora": {"rank": 8}}
    path.write_text(yaml.safe_dump(raw))
    removal = run_removal(load_config(path))
    assert removal["groups"]  # some queries are answered correctly (greedy completion)


def test_subspace_scores_of_lora_copies_equal_the_library(harness, data, tmp_path):
    daunce = {
        "num_models": K,
        "score": "subspace",
        "objective": {"labels": "sampled", "rho": 0.1},
        "train": {"optimizer": "sgd", "lr": "auto", "epochs": 1, "batch_size": 16},
    }
    config = load_config(lm_config(tmp_path, data, daunce=daunce))
    result = run_attribute(config)
    assert any(k.startswith("reflect-copies") for k in result["states"])
    scores = scores_of(result["run_dir"])
    theta0 = next((tmp_path / "ws").glob("models/*/theta0"))
    columns = {
        split: pl.read_parquet(data[split]).to_dict(as_series=False)
        for split in ("train", "queries")
    }
    access = HFLoraAccess.from_folder(
        theta0,
        config.task,
        columns["train"],
        columns["queries"],
        config.daunce,
        lora=LoraSpec(rank=4, alpha=8),
        compute=config.compute,
    )
    _, parts = access.run_subspace(range(K))
    expected = subspace_scores(parts.train.central(), parts.query.central(), parts.curvature)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
    # The stored curvature factors are the hidden width per completion token, not the vocabulary.
    changes = RunStore(Path(result["run_dir"]) / "store").open("output_changes")
    assert (changes.shape[1], changes.shape[-1]) == (N, 32)

"""The base model (trained from its recipe, or the user's checkpoint) and its base signals."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.access import REMOTE_KINDS
from daunce_core.access.hf_lora.access import encode, make_task
from daunce_core.access.hf_lora.base import make_base, num_labels, parse_recipe
from daunce_core.access.hf_lora.models import context_window, load_model
from daunce_core.access.task import task_from_spec
from daunce_core.access.torch_module.models import build_model, load_parameters, save_parameters
from daunce_core.access.torch_module.training import fit
from daunce_core.conversion import from_dict
from daunce_core.evaluation.base_quality import fit_warning, measure_split, summarize
from daunce_core.method.config import DTYPES, TrainConfig
from daunce_core.method.objectives import Objective
from daunce_core.method.signals import compute_base_signals
from daunce_core.storage.digest import digest_arrays, digest_json, digest_model, digest_path
from daunce_core.storage.exports import write_parquet
from daunce_core.storage.files import save_tensors
from daunce_core.storage.sources import read_canonical
from tasks.common import (
    api_client,
    artifact,
    load_base_model,
    load_columns,
    load_split,
    retry_transient,
)


@task(
    name="base-model",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
)
def base_model(
    model_spec: dict, task_spec: dict, train: dict, path: str, checkpoint_digest: str | None
) -> dict:
    """Train the base model from its recipe, or load the user's checkpoint; save to ``path``.

    A language model (``access: hf_lora``) is made by `daunce_core.access.hf_lora.base.make_base`
    instead: ``path``'s folder gets ``pretrained/`` and ``theta0/`` model folders.
    """
    if model_spec.get("access") == "hf_lora":
        return _language_model(model_spec, task_spec, train, path)
    if model_spec.get("access") in REMOTE_KINDS:
        return _api_model(model_spec, path)
    model = build_model(model_spec["recipe"], seed=model_spec["seed"])
    if model_spec.get("checkpoint"):
        load_parameters(model, model_spec["checkpoint"])
    else:
        data = load_split(train["uri"], train["digest"])
        recipe = from_dict(TrainConfig, model_spec["train"], "model.train")
        fit(
            model,
            task_from_spec(task_spec),
            data,
            recipe,
            l2=model_spec["l2"],
            seed=model_spec["seed"],
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_parameters(model, path)
    inputs = [train["uri"]] + ([model_spec["checkpoint"]] if model_spec.get("checkpoint") else [])
    return artifact(path, "model/base", digest_model(model), "base-model", inputs=inputs)


def _language_model(model_spec: dict, task_spec: dict, train: dict, path: str) -> dict:
    """θ0 of an ``hf_lora`` run (and the model it was fine-tuned from), as model folders."""
    recipe = parse_recipe(model_spec["recipe"])
    columns = load_columns(train["uri"], train["digest"])
    folder = Path(path).parent
    made = make_base(
        recipe,
        from_dict(TrainConfig, model_spec["train"], "model.train"),
        task_spec,
        columns,
        folder,
        seed=model_spec["seed"],
        labels=num_labels(task_spec, columns),
    )
    theta0 = made["theta0"]
    record = artifact(
        theta0, "model/base", digest_path(theta0), "base-model", inputs=[train["uri"]]
    )
    return record | {"pretrained": str(made["pretrained"])}


def _api_model(model_spec: dict, path: str) -> dict:
    """θ0 of an ``api`` or ``prompt`` run: checked on its server (key, model, loss method).

    The file holds the server, the model's id and the loss method the server answers
    (``model.recipe.loss``, or what ``auto`` found), so every copy measures losses the same way.
    """
    client = api_client(model_spec["recipe"], model_spec["access"])
    recipe = client.recipe
    client.check_model(recipe.model)
    named = {
        "base_url": recipe.base_url.rstrip("/"),
        "model": recipe.model,
        "loss_method": client.loss_method(recipe.model),
    }
    out = Path(path).parent / "api-model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(named, indent=1))
    # Named by the model and how its losses are read, not by the address it is served at.
    same = {k: v for k, v in named.items() if k != "base_url"}
    return artifact(out, "model/base", digest_json(same), "base-model") | {
        "usage": client.usage.as_dict()
    }


@task(name="base-signals", cache_policy=NO_CACHE)
def base_signals(
    model_spec: dict,
    task_spec: dict,
    signal_spec: dict,
    model: dict,
    train: dict,
    path: str,
    batch_size: int = 1024,
) -> dict:
    """Base logits, values and logit-gradients of every training example (white-box runs).

    ``signal_spec`` holds only what the signals depend on: the objective ``variant`` (loss or
    margin) and the ``dtype``; ``batch_size`` (examples per forward pass) only how.
    """
    dtype = DTYPES[signal_spec["dtype"]]
    network = load_base_model(model_spec["recipe"], model["uri"]).to(dtype)
    data = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in load_split(train["uri"], train["digest"]).items()
    }
    objective = Objective(variant=signal_spec["variant"])
    signals = compute_base_signals(network, task_from_spec(task_spec), data, objective, batch_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.contiguous() for k, v in signals.items()}, path)
    return artifact(
        path,
        "model/signals",
        digest_arrays(signals),
        "base-signals",
        inputs=[model["uri"], train["uri"]],
        shape=list(signals["grad"].shape),
    )


@task(name="base-quality", cache_policy=NO_CACHE)
def base_quality(
    model_spec: dict,
    task_spec: dict,
    model: dict,
    train: dict,
    queries: dict,
    path: str,
    batch_size: int = 1024,
) -> dict:
    """How well the base model fits: loss and accuracy on the training set and the queries.

    Writes one row per example to ``path`` (Parquet: ``split``, ``example_id``, ``label`` where
    the task names one, ``loss``, and where the task allows ``correct``, ``predicted`` and its
    ``probability``); returns the record with the ``metrics``
    (`daunce_core.evaluation.base_quality.summarize`: ``base/train_loss``,
    ``base/train_accuracy``, ``base/query_loss``, ``base/query_accuracy``,
    ``base/majority_rate``) and the ``warning`` of a model that fits its training data poorly
    (`~daunce_core.evaluation.base_quality.fit_warning`). Accuracy needs
    ``Task.correct_from_outputs`` (classification has it). ``batch_size`` says only how.
    """
    if model_spec.get("access") in REMOTE_KINDS:
        return _api_quality(model_spec, task_spec, model, train, queries, path)
    if model_spec.get("access") == "hf_lora":
        network, task_, data = _language_split_data(model_spec, task_spec, model, train, queries)
    else:
        network, task_ = (
            load_base_model(model_spec["recipe"], model["uri"]),
            task_from_spec(task_spec),
        )
        data = {
            split: load_split(record["uri"], record["digest"])
            for split, record in (("train", train), ("queries", queries))
        }
    label = getattr(task_, "label_key", None) or getattr(task_, "target_key", None)
    frames, measured, labels = [], {}, {}
    for split, record in (("train", train), ("queries", queries)):
        measured[split] = measure_split(network, task_, data[split], batch_size=batch_size)
        _, ids = read_canonical(record["uri"])
        columns = {"split": [split] * len(ids), "example_id": ids}
        if label in data[split] and data[split][label].dim() == 1:
            labels[split] = data[split][label].numpy()
            columns["label"] = labels[split]
        frames.append(pl.DataFrame(columns | measured[split]))
    kind = task_spec.get("kind", "classification")
    classification = kind in ("classification", "sequence_classification")
    metrics = summarize(
        measured["train"], measured["queries"], labels.get("train") if classification else None
    )
    write_parquet(pl.concat(frames, how="diagonal_relaxed"), path)
    record = artifact(path, "model/quality", digest_json(metrics), "base-quality")
    return record | {
        "inputs": [model["uri"], train["uri"], queries["uri"]],
        "metrics": metrics,
        "warning": fit_warning(metrics),
    }


def _language_split_data(model_spec, task_spec, model, train, queries):
    """θ0 of an ``hf_lora`` run, its task, and both splits tokenised for it."""
    columns = {
        split: load_columns(record["uri"], record["digest"])
        for split, record in (("train", train), ("queries", queries))
    }
    network, tokenizer = load_model(
        model["uri"], task_spec["kind"], num_labels=num_labels(task_spec, *columns.values())
    )
    window = context_window(network)
    data = {
        split: encode(task_spec, tokenizer, values, window, f"data.{split}")
        for split, values in columns.items()
    }
    return network, make_task(task_spec["kind"]), data


def _api_quality(model_spec, task_spec, model, train, queries, path) -> dict:
    """θ0's losses on both splits, read from its server (``api``, ``prompt``: no accuracy)."""
    from daunce_core.access.api.access import TextExamples, example_losses

    client = api_client(model_spec["recipe"], model_spec["access"])
    base = json.loads(Path(model["uri"]).read_text())
    frames, measured = [], {}
    for split, record in (("train", train), ("queries", queries)):
        columns = load_columns(record["uri"], record["digest"])
        examples = TextExamples.from_columns(task_spec, columns, f"data.{split}")
        losses = example_losses(client, base["loss_method"], base["model"], examples)
        measured[split] = {"loss": losses}
        _, ids = read_canonical(record["uri"])
        frames.append(
            pl.DataFrame({"split": [split] * len(ids), "example_id": ids, "loss": losses})
        )
    metrics = summarize(measured["train"], measured["queries"])
    write_parquet(pl.concat(frames), path)
    record = artifact(path, "model/quality", digest_json(metrics), "base-quality")
    return record | {
        "inputs": [model["uri"], train["uri"], queries["uri"]],
        "metrics": metrics,
        "warning": None,
        "usage": client.usage.as_dict(),
    }

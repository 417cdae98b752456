"""What every task shares: artefact records, loaders, per-thread contexts, the retry rule.

Tasks take and return paths, digests and small dicts — never tensors or models — so Prefect
can cache them by their inputs and retry them cheaply. Each task writes one durable artefact
under the run folder and returns its record for the lineage database.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from daunce_core.access import KINDS, ModelAccess
from daunce_core.access.task import task_from_spec
from daunce_core.access.torch_module.models import build_model, load_parameters
from daunce_core.conversion import from_dict
from daunce_core.data import ExampleSet
from daunce_core.errors import DaunceError
from daunce_core.method.config import ComputeConfig, DaunceConfig
from daunce_core.storage.sources import read_canonical


def artifact(uri, kind: str, digest: str, producer: str, inputs=(), shape=None) -> dict:
    """The lineage record of one artefact."""
    return {
        "uri": str(uri),
        "kind": kind,
        "digest": digest,
        "producer": producer,
        "inputs": [str(i) for i in inputs],
        "shape": shape,
    }


@functools.lru_cache(maxsize=8)
def load_split(folder: str, digest: str) -> ExampleSet:
    """A canonical split as tensors (floats as float32); memoised per process by digest."""
    columns, _ = read_canonical(folder)
    return {k: _tensor(v) for k, v in columns.items() if v.dtype.kind != "U"}


@functools.lru_cache(maxsize=8)
def load_columns(folder: str, digest: str) -> dict[str, np.ndarray]:
    """A canonical split's columns as NumPy arrays, text included; memoised by digest."""
    columns, _ = read_canonical(folder)
    return columns


def _tensor(values: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor.float() if torch.is_floating_point(tensor) else tensor


def load_base_model(recipe: dict, path: str, seed: int = 0) -> torch.nn.Module:
    """The base model: built from its recipe, parameters loaded from ``path``."""
    return load_parameters(build_model(recipe, seed=seed), path).eval()


DETERMINISTIC_OS_ERRORS = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
"""I/O errors that another attempt meets again: a wrong path is no passing failure."""


def transient(error: BaseException | None) -> bool:
    """Whether another attempt may succeed where ``error`` failed.

    Only I/O failures (`OSError`: timeouts, lost connections, a full or flaky disk; not a
    missing file or a refused permission) and a GPU out of memory are; a `DaunceError` or
    `TaskError` (bad input or configuration), any other `ValueError` or `TypeError`, and
    everything else are deterministic.
    """
    if isinstance(error, DETERMINISTIC_OS_ERRORS):
        return False
    if isinstance(error, OSError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def retry_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn`` of daunce's tasks: retry `transient` failures only.

    Prefect passes the failed state; a task that raised holds the exception as its data.
    """
    return transient(getattr(state, "data", None))


def per_thread(build: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Memoise ``build(spec)`` per process and thread (at most 8 specs).

    One per thread: ``functional_call`` swaps a module's parameters while it runs, so two
    threads must never train through the same module at once.
    """

    @functools.lru_cache(maxsize=8)
    def cached(spec_json: str, thread: int) -> Any:
        return build(json.loads(spec_json))

    @functools.wraps(build)
    def get(spec: dict) -> Any:
        return cached(json.dumps(spec, sort_keys=True), threading.get_ident())

    return get


@per_thread
def copy_access(spec: dict) -> ModelAccess:
    """The model access a copy spec names (data, base model, signals and settings loaded)."""
    kind = spec.get("kind", "torch")
    if kind not in KINDS:
        raise DaunceError(f"unknown model access kind {kind!r}; known kinds: {sorted(KINDS)}.")
    config = from_dict(DaunceConfig, spec["daunce"], "daunce")
    compute = from_dict(ComputeConfig, spec["compute"], "compute")
    if kind == "hf_lora":
        return _language_access(spec, config, compute)
    if kind == "prompt":
        return prompt_access(spec, config)
    if kind == "api":
        return api_access(
            spec["recipe"],
            spec["task"],
            spec["train"],
            spec["queries"],
            config,
            spec["label"],
            spec["model"]["uri"],
        )
    signals = load_file(spec["signals"]["uri"]) if spec.get("signals") else None
    return KINDS[kind](
        load_base_model(spec["recipe"], spec["model"]["uri"]),
        task_from_spec(spec["task"]),
        load_split(spec["train"]["uri"], spec["train"]["digest"]),
        load_split(spec["queries"]["uri"], spec["queries"]["digest"]),
        config,
        base_l2=spec["l2"],
        signals=signals,
        compute=compute,
    )


def _language_access(spec: dict, config: DaunceConfig, compute: ComputeConfig) -> ModelAccess:
    """The ``hf_lora`` access of a copy spec: θ0's folder and the splits' text columns."""
    from daunce_core.access.hf_lora.access import HFLoraAccess
    from daunce_core.access.hf_lora.base import parse_recipe

    return HFLoraAccess.from_folder(
        spec["model"]["uri"],
        spec["task"],
        load_columns(spec["train"]["uri"], spec["train"]["digest"]),
        load_columns(spec["queries"]["uri"], spec["queries"]["digest"]),
        config,
        lora=parse_recipe(spec["recipe"]).lora,
        compute=compute,
        base_l2=spec["l2"],
    )


def api_key(recipe) -> str:
    """The API key of an ``api`` run: from its Prefect Secret block, or its environment variable.

    The key is never written anywhere: not in the configuration, the lineage or the logs.
    """
    import os

    if recipe.key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(recipe.key_secret).get()
        except ValueError as error:
            raise DaunceError(
                f"no Prefect Secret block named {recipe.key_secret!r} (model.recipe.key_secret): "
                f"{error}. Create it, e.g. Secret(value=...).save({recipe.key_secret!r})."
            ) from error
    key = os.environ.get(recipe.key_env)
    if not key:
        state = "empty" if recipe.key_env in os.environ else "not set"
        raise DaunceError(
            f"the API key is read from the environment variable {recipe.key_env} "
            f"(model.recipe.key_env), which is {state}; export it, e.g. "
            f"`export {recipe.key_env}=<your key>`. The key never goes into the configuration."
        )
    return key


def api_client(recipe: dict, access: str = "api"):
    """A client of an ``api`` or ``prompt`` run's server (`access.api.client.APIClient`).

    ``access``: the run's ``model.access``, which decides how the recipe reads (its ``kind``
    may be left out).
    """
    from daunce_core.access.api.client import APIClient
    from daunce_core.access.api.config import parse_api_recipe
    from daunce_core.access.prompt.config import parse_prompt_recipe

    parsed = parse_prompt_recipe(recipe).server if access == "prompt" else parse_api_recipe(recipe)
    return APIClient(parsed, api_key(parsed))


def prompt_access(spec: dict, config: DaunceConfig) -> ModelAccess:
    """The ``prompt`` access of a copy spec: its server, θ0, the splits' text, the search."""
    from daunce_core.access.prompt.access import PromptAccess
    from daunce_core.access.prompt.config import parse_prompt_recipe

    recipe = parse_prompt_recipe(spec["recipe"])
    base = json.loads(Path(spec["model"]["uri"]).read_text())
    return PromptAccess(
        api_client(spec["recipe"], "prompt"),
        base["model"],
        base["loss_method"],
        *text_splits(spec["task"], spec["train"], spec["queries"]),
        config,
        recipe.search,
        recipe.budget,
    )


def text_splits(task_spec: dict, train: dict, queries: dict) -> tuple:
    """Both splits of a server run as the text the server reads (`TextExamples`)."""
    from daunce_core.access.api.access import TextExamples

    return tuple(
        TextExamples.from_columns(
            task_spec, load_columns(record["uri"], record["digest"]), f"data.{name}"
        )
        for name, record in (("train", train), ("queries", queries))
    )


def api_access(
    recipe: dict,
    task_spec: dict,
    train: dict,
    queries: dict,
    config: DaunceConfig,
    label: str,
    model_uri: str,
) -> ModelAccess:
    """The ``api`` access of a run: its server, θ0's id and loss method, the splits' text."""
    from daunce_core.access.api.access import APIAccess

    base = json.loads(Path(model_uri).read_text())
    return APIAccess(
        api_client(recipe),
        base["model"],
        base["loss_method"],
        *text_splits(task_spec, train, queries),
        config,
        label,
    )

"""What every task shares: the cache policy, the run folder's layout, artefact records.

Tasks take and return paths, digests and small dicts — never tensors or models — so Prefect
can cache them by their inputs and retry them cheaply. Each task writes one durable artefact
under the run folder and returns its record for the lineage database.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE
from safetensors.torch import load_file

from daunce_core.config import DaunceConfig, from_dict
from daunce_core.data import ExampleSet
from daunce_core.models import build_model, load_parameters
from daunce_core.runner import PerturbedCopies
from daunce_core.sources import read_canonical
from daunce_core.task import task_from_spec

CACHE_POLICY = INPUTS + TASK_SOURCE
"""Cache on the task's inputs (paths and content digests) and its code."""


class RunLayout:
    """Where a run keeps each artefact, under ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)

    def split(self, name: str) -> Path:
        """Canonical data of split ``name`` (``train`` or ``queries``)."""
        return self.root / "data" / name

    @property
    def base_model(self) -> Path:
        """The base model's parameters."""
        return self.root / "model" / "base.safetensors"

    @property
    def signals(self) -> Path:
        """The base signals (logits, values, logit-gradients of the training set)."""
        return self.root / "model" / "signals.safetensors"

    @property
    def store(self) -> Path:
        """The Zarr arrays (losses, completion marks, scores)."""
        return self.root / "store"

    def copy(self, k: int) -> Path:
        """The trained parameters of perturbed copy ``k``."""
        return self.root / "copies" / f"copy-{k:06d}.safetensors"

    def export(self, name: str) -> Path:
        """Parquet export ``name``."""
        return self.root / "exports" / f"{name}.parquet"


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
    return {k: _tensor(v) for k, v in columns.items()}


def _tensor(values: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor.float() if torch.is_floating_point(tensor) else tensor


def load_base_model(recipe: dict, path: str, seed: int = 0) -> torch.nn.Module:
    """The base model: built from its recipe, parameters loaded from ``path``."""
    return load_parameters(build_model(recipe, seed=seed), path).eval()


@functools.lru_cache(maxsize=4)
def copies_context(run_dir: str, spec_json: str) -> PerturbedCopies:
    """`PerturbedCopies` of a run, built once per process for its (JSON) spec."""
    spec = json.loads(spec_json)
    layout = RunLayout(run_dir)
    config = from_dict(DaunceConfig, spec["daunce"], "daunce")
    model = load_base_model(spec["recipe"], str(layout.base_model))
    train = load_split(str(layout.split("train")), spec["train_digest"])
    queries = load_split(str(layout.split("queries")), spec["queries_digest"])
    signals = load_file(str(layout.signals)) if layout.signals.exists() else None
    return PerturbedCopies(
        model,
        task_from_spec(spec["task"]),
        train,
        queries,
        config,
        base_l2=spec["l2"],
        signals=signals,
    )

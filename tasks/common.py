"""What every task shares: the cache policy, the run folder's layout, artefact records.

Tasks take and return paths, digests and small dicts — never tensors or models — so Prefect
can cache them by their inputs and retry them cheaply. Each task writes one durable artefact
under the run folder and returns its record for the lineage database.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import numpy as np
import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE
from safetensors.torch import load_file

from daunce_core.access.task import task_from_spec
from daunce_core.access.torch_module.access import PerturbedCopies
from daunce_core.access.torch_module.models import build_model, load_parameters
from daunce_core.conversion import from_dict
from daunce_core.data import ExampleSet
from daunce_core.method.config import DaunceConfig
from daunce_core.storage.sources import read_canonical

CACHE_POLICY = INPUTS + TASK_SOURCE
"""Cache on the task's inputs (paths and content digests) and its code."""


class Layout:
    """Where artefacts live in a workspace.

    Artefacts that several runs can share — canonical data, base models, base signals — are
    content-addressed (``<workspace>/<kind>/<digest of what they depend on>/``), so a run that
    changes only DAUNCE's settings reuses the base model and the data preparation of another;
    a run's own artefacts (loss store, copies, exports) live in ``<workspace>/runs/<run_id>/``.
    """

    def __init__(self, workspace: str | Path, run_id: str) -> None:
        self.workspace = Path(workspace)
        self.root = self.workspace / "runs" / run_id

    @classmethod
    def of_run(cls, run_dir: str | Path) -> Layout:
        """The layout of the run whose folder is ``run_dir`` (``<workspace>/runs/<run_id>``)."""
        run_dir = Path(run_dir)
        return cls(run_dir.parent.parent, run_dir.name)

    def shared(self, kind: str, key: str) -> Path:
        """Folder of a shared artefact of ``kind`` whose inputs digest to ``key``."""
        return self.workspace / kind / key[:16]

    @property
    def store(self) -> Path:
        """The run's Zarr arrays (losses, completion marks, scores)."""
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


def copies_context(spec_json: str) -> PerturbedCopies:
    """`PerturbedCopies` for a (JSON) copy spec, built once per process and thread.

    One per thread: ``functional_call`` swaps a module's parameters while it runs, so two
    threads must never train through the same module at once.
    """
    return _copies_context(spec_json, threading.get_ident())


@functools.lru_cache(maxsize=8)
def _copies_context(spec_json: str, thread: int) -> PerturbedCopies:
    spec = json.loads(spec_json)
    config = from_dict(DaunceConfig, spec["daunce"], "daunce")
    model = load_base_model(spec["recipe"], spec["model"]["uri"])
    train = load_split(spec["train"]["uri"], spec["train"]["digest"])
    queries = load_split(spec["queries"]["uri"], spec["queries"]["digest"])
    signals = load_file(spec["signals"]["uri"]) if spec.get("signals") else None
    return PerturbedCopies(
        model,
        task_from_spec(spec["task"]),
        train,
        queries,
        config,
        base_l2=spec["l2"],
        signals=signals,
    )

"""The configuration of a pipeline run (YAML), checked field by field.

```yaml
name: digits                       # a label; runs are named <name>-<digest>
workspace: daunce-runs             # folder of runs/, lineage.duckdb and Prefect's cache
data:
  train: {path: data/digits/train.parquet}      # Parquet, JSONL, NPZ or a saved HF dataset
  queries: {path: data/digits/queries.parquet, columns: {x: x, y: y}, id_column: null}
task: {kind: classification, input: x, label: y}
model:
  recipe: {kind: mlp, inputs: 64, hidden: [64], outputs: 10}
  checkpoint: null                 # a trained model (safetensors / state dict); null = train
  l2: 0.001                        # its L2 strength (DAUNCE's default proximal λ)
  seed: 0
  train: {lr: 0.1, epochs: 30, batch_size: 64}
daunce:                            # daunce_core.DaunceConfig; objective and train nested
  num_models: 64
  objective: {variant: hessian, labels: observed}
exports: {top_k: 20}
execution: {task_runner: threads, workers: 2, retries: 2}
```

The run's identity (its folder name and cache keys) covers everything that determines the
copies' losses; ``daunce.num_models`` and the query set are left out so that a run can be
extended with more copies or new queries without starting over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daunce_core.config import DaunceConfig, from_dict, to_dict
from daunce_core.digest import digest_json, digest_path
from daunce_core.errors import DaunceError
from daunce_core.sources import DataSource
from daunce_core.training import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    """The training set, and the query set: one source, or a list concatenated in order.

    ``daunce add-queries`` appends a source to the list; ids of sources without an id column
    continue after the previous source's.
    """

    train: DataSource
    queries: DataSource | list[DataSource]

    def query_sources(self) -> list[DataSource]:
        """The query sources, as a list."""
        return self.queries if isinstance(self.queries, list) else [self.queries]


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a recipe, and a checkpoint or a training recipe."""

    recipe: dict
    checkpoint: str | None = None
    l2: float = 0.0
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.1, epochs=30))


@dataclass(frozen=True)
class ExportConfig:
    """What the run exports to Parquet."""

    top_k: int = 20

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise DaunceError(f"top_k must be >= 1; got {self.top_k}.")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the copies fan out: ``threads`` (default) or ``dask`` (a local or remote cluster)."""

    task_runner: str = "threads"
    workers: int = 2
    retries: int = 2
    dask_address: str | None = None

    def __post_init__(self) -> None:
        if self.task_runner not in ("threads", "dask"):
            raise DaunceError(f"task_runner must be 'threads' or 'dask'; got {self.task_runner!r}.")
        if self.workers < 1 or self.retries < 0:
            raise DaunceError("workers must be >= 1 and retries >= 0.")


@dataclass(frozen=True)
class RunConfig:
    """A whole pipeline run."""

    data: DataConfig
    model: ModelConfig
    name: str = "run"
    workspace: str = "daunce-runs"
    task: dict = field(default_factory=lambda: {"kind": "classification"})
    daunce: DaunceConfig = field(default_factory=DaunceConfig)
    exports: ExportConfig = field(default_factory=ExportConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def identity(self) -> dict:
        """What names the run: everything but K, the queries and how it is executed.

        Files enter by content, not location: the training data and the checkpoint are
        replaced by their digests, so moving them (or the checkout) keeps the run's name.
        """
        plain = to_dict(self)
        plain["daunce"].pop("num_models")
        plain["data"].pop("queries")
        train = plain["data"]["train"]
        train["path"] = digest_path(train["path"]) if Path(train["path"]).exists() else None
        checkpoint = plain["model"]["checkpoint"]
        if checkpoint:
            plain["model"]["checkpoint"] = digest_path(checkpoint)
        for key in ("name", "workspace", "exports", "execution"):
            plain.pop(key)
        return plain

    def digest(self) -> str:
        """Digest of `identity`."""
        return digest_json(self.identity())

    def run_id(self) -> str:
        """``<name>-<first 12 hex digits of the digest>``."""
        return f"{self.name}-{self.digest()[:12]}"


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read a YAML run configuration; ``overrides`` replace top-level fields (e.g. workspace).

    Relative data, checkpoint and workspace paths are resolved against the file's folder.
    """
    path = Path(path)
    if not path.exists():
        raise DaunceError(f"configuration file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DaunceError(f"{path} is not valid YAML: {error}") from error
    raw = _resolve_paths(raw, path.parent)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(RunConfig, raw, "")


def _resolve_paths(raw: dict, base: Path) -> dict:
    def absolute(value: str) -> str:
        return str((base / value).resolve()) if not Path(value).is_absolute() else value

    for split in ("train", "queries"):
        sources = raw.get("data", {}).get(split)
        for source in sources if isinstance(sources, list) else [sources]:
            if isinstance(source, dict) and "path" in source:
                source["path"] = absolute(source["path"])
    if raw.get("model", {}).get("checkpoint"):
        raw["model"]["checkpoint"] = absolute(raw["model"]["checkpoint"])
    if "workspace" in raw:
        raw["workspace"] = absolute(raw["workspace"])
    return raw

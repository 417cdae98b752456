"""Small configurations of the attribute flow for the pipeline tests."""

from pathlib import Path

import numpy as np
import polars as pl
import yaml
import zarr

from daunce_core.datasets import digits


def write_data(folder: Path, n: int = 240, m: int = 30) -> dict:
    """A digits subset as Parquet: n train and m query examples."""
    folder.mkdir(parents=True, exist_ok=True)
    train, queries = digits(num_queries=200, seed=0)
    paths = {}
    for name, split, count in (("train", train, n), ("queries", queries, m)):
        frame = pl.DataFrame({"x": split["x"][:count].numpy(), "y": split["y"][:count].numpy()})
        paths[name] = folder / f"{name}.parquet"
        frame.write_parquet(paths[name])
    return paths


def write_config(path: Path, workspace: Path, data: dict, **daunce) -> Path:
    """A run configuration with a small MLP and ``daunce`` overrides."""
    config = {
        "name": "t",
        "workspace": str(workspace),
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "task": {"kind": "classification"},
        "model": {
            "recipe": {"kind": "mlp", "inputs": 64, "hidden": [16], "outputs": 10},
            "l2": 1e-3,
            "train": {"lr": 0.1, "epochs": 5, "batch_size": 32},
        },
        "daunce": {"num_models": 8, "group_size": 4, "train": {"lr": 0.01, "epochs": 1}} | daunce,
        "exports": {"top_k": 5},
        "execution": {"workers": 2, "retries": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def scores_of(run_dir: str) -> np.ndarray:
    """The stored score matrix of a run."""
    return np.asarray(zarr.open_array(store=str(Path(run_dir) / "store" / "scores"), mode="r")[:])


def losses_of(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored loss matrices of a run."""
    store = Path(run_dir) / "store"
    return tuple(
        np.asarray(zarr.open_array(store=str(store / name), mode="r")[:])
        for name in ("losses_train", "losses_query")
    )

"""Every configuration value is checked against its field's type when a YAML file loads.

One bad value per kind of field (int, float, bool, str, Literal, tuple, optional, union,
nested dataclass, list of dataclasses, list of ints, dict): the error names the field's full
path, the type expected and the value given; nothing is rounded or coerced silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from daunce_core.errors import DaunceError
from flows.config import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 20), ("queries", 5)):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        paths[split] = folder / f"{split}.parquet"
        pl.DataFrame({"x": x, "y": rng.integers(0, 3, n)}).write_parquet(paths[split])
    return paths


def load(tmp_path: Path, data: dict, field: str, value) -> object:
    """Load a valid configuration whose ``field`` (a dotted path) is set to ``value``."""
    raw = {
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "model": {"recipe": {"kind": "linear", "inputs": 4, "outputs": 3}},
        "daunce": {"num_models": 4},
    }
    *parents, name = field.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[name] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


BAD = [
    ("daunce.num_models", 16.7, "an integer"),
    ("daunce.num_models", "many", "an integer"),
    ("daunce.num_models", True, "an integer"),
    ("daunce.subset_ratio", "half", "a number"),
    ("daunce.subset_ratio", False, "a number"),
    ("daunce.antithetic", "yes", "true or false"),
    ("daunce.antithetic", 1, "true or false"),
    ("name", 5, "a string"),
    ("daunce.score", "best", "one of ['correlation', 'covariance', 'subspace']"),
    ("compute.device", "tpu", "one of ['auto', 'cpu', 'cuda']"),
    ("daunce.train.betas", [0.9], "a list of 2 numbers"),
    ("daunce.train.betas[0]", ["high", 0.99], "a number"),
    ("daunce.prox", "strong", "a number or null"),
    ("daunce.train.steps", 2.5, "an integer or null"),
    ("daunce.objective", "hessian", "a mapping of Objective fields"),
    ("daunce.objective.rho", "big", "a number"),
    ("evaluation.baselines[0]", [7], "a mapping of BaselineConfig fields"),
    ("evaluation.scores[0].path", [{"name": "mine", "path": 3}], "a string"),
    ("evaluation.removal.sizes[1]", [10, "all"], "an integer"),
    ("task", "classification", "a mapping"),
    ("data.train.columns.x", {"x": 1}, "a string"),
    ("data.queries", "queries.parquet", "a mapping of DataSource fields or a list of"),
    ("exports.top_k", None, "an integer"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD)
def test_a_value_of_the_wrong_type_names_its_field_the_type_and_the_value(
    tmp_path, data, field, value, expected
):
    with pytest.raises(DaunceError) as raised:
        load(tmp_path, data, _where_set(field), value)
    message = str(raised.value)
    assert f"config field {field} must be {expected}" in message, message
    assert f"got {_shown(field, value)!r}" in message, message


def _where_set(field: str) -> str:
    """The field the table sets (a list or mapping holding the bad item)."""
    if field == "data.train.columns.x":
        return "data.train.columns"
    return re.sub(r"\[\d+\].*$", "", field)


def _shown(field: str, value):
    """The bad value itself, inside the list or mapping the table gives."""
    index = re.search(r"\[(\d+)\](?:\.(\w+))?$", field)
    if index:
        item = value[int(index.group(1))]
        return item[index.group(2)] if index.group(2) else item
    return value["x"] if field == "data.train.columns.x" else value


def test_good_values_load_as_their_fields_types(tmp_path, data):
    assert load(tmp_path, data, "daunce.subset_ratio", 1).daunce.subset_ratio == 1  # int: float
    whole = load(tmp_path, data, "daunce.num_models", 16.0).daunce.num_models
    assert whole == 16
    assert type(whole) is int  # a whole float is an int, never a rounded fraction
    assert load(tmp_path, data, "daunce.prox", None).daunce.prox is None
    assert load(tmp_path, data, "daunce.train.betas", [0.8, 0.9]).daunce.train.betas == (0.8, 0.9)
    listed = load(tmp_path, data, "data.queries", [{"path": str(data["queries"])}])
    assert len(listed.data.query_sources()) == 1
    named = load(tmp_path, data, "evaluation.baselines", ["gradient_dot"])
    assert named.evaluation.baselines[0].method == "gradient_dot"


@pytest.mark.parametrize("name", ["DaunceConfig", "ComputeConfig", "TrainConfig", "attribute"])
def test_each_public_name_imports_first_in_a_fresh_process(name):
    """``from daunce_core import DaunceConfig`` as a program's first import (was circular)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"from daunce_core import {name}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-1500:]

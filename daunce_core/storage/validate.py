"""Checks of a run's data before anything trains, with errors that name the file and the fix.

Two moments:

- when a configuration loads (before Prefect starts): the task and model recipe
  (`check_task`, `check_recipe`), each source's schema and first row against them
  (`check_columns`: the task's columns exist and hold numbers, the features' width is the
  recipe's ``inputs``, class labels are integers), the queries against the training data
  (`check_splits`), and the class labels' values (`check_labels`: one column read);
- when a split is prepared: every value of every numeric column of each source
  (`check_source`, with the library's own `as_example_set`: at least one example, finite).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from daunce_core.access.torch_module.models import KINDS as RECIPE_KINDS
from daunce_core.data import as_example_set, check_compatible
from daunce_core.errors import DaunceError
from daunce_core.storage.sources import NUMERIC, DataSource, Schema, is_text

TASK_FIELDS = {
    "classification": ("input", "label"),
    "regression": ("input", "target"),
    "factory": ("factory", "kwargs"),
    "causal_lm": ("prompt", "completion", "chat", "separator"),
    "sequence_classification": ("text", "label"),
}
"""The fields of each task kind (`daunce_core.access.task.task_from_spec`) besides ``kind``."""

DEFAULT_COLUMNS = {
    "input": "x",
    "label": "y",
    "target": "y",
    "prompt": "prompt",
    "completion": "completion",
    "text": "text",
}
TEXT_FIELDS = ("prompt", "completion", "text")
"""Task fields naming text columns (language models, `daunce_core.access.hf_lora`)."""
LM_TASKS = ("causal_lm", "sequence_classification")
"""Task kinds of Hugging Face models (``model.access: hf_lora``)."""
RECIPE_FIELDS = {
    "mlp": ("inputs", "hidden", "outputs"),
    "linear": ("inputs", "outputs"),
    "factory": ("factory", "kwargs"),
}


def check_task(task: dict) -> None:
    """Refuse an unknown task kind, unknown fields, or column names that are not strings."""
    kind = task.get("kind", "classification")
    if kind not in TASK_FIELDS:
        raise DaunceError(f"task.kind must be one of {list(TASK_FIELDS)}; got {kind!r}.")
    _known_fields(task, ("kind", *TASK_FIELDS[kind]), "task", f"task kind {kind!r}")
    if kind == "factory":
        _check_factory(task.get("factory"), "task.factory")
        return
    for name, column in task_columns(task).items():
        if not isinstance(column, str):
            raise DaunceError(f"task.{name} must be a column name (a string); got {column!r}.")
    if not isinstance(task.get("chat", False), bool):
        raise DaunceError(f"task.chat must be true or false; got {task['chat']!r}.")
    if not isinstance(task.get("separator", " "), str):
        raise DaunceError(f"task.separator must be text; got {task['separator']!r}.")


def task_columns(task: dict) -> dict[str, str]:
    """The task's fields naming columns and the columns they name: ``{"input": "x", ...}``."""
    kind = task.get("kind", "classification")
    if kind == "factory":
        return {}
    names = [name for name in TASK_FIELDS[kind] if name in DEFAULT_COLUMNS]
    return {name: task.get(name, DEFAULT_COLUMNS[name]) for name in names}


def check_recipe(recipe: dict) -> None:
    """Refuse an unknown model kind, unknown fields, or sizes that are not positive integers."""
    kind = recipe.get("kind")
    if kind not in RECIPE_KINDS:
        raise DaunceError(f"model.recipe.kind must be one of {list(RECIPE_KINDS)}; got {kind!r}.")
    _known_fields(recipe, ("kind", *RECIPE_FIELDS[kind]), "model.recipe", f"recipe kind {kind!r}")
    if kind == "factory":
        _check_factory(recipe.get("factory"), "model.recipe.factory")
        return
    for name in ("inputs", "outputs"):
        _positive_int(recipe.get(name), f"model.recipe.{name}")
    hidden = recipe.get("hidden", [])
    if not isinstance(hidden, list):
        raise DaunceError(f"model.recipe.hidden must be a list of layer widths; got {hidden!r}.")
    for i, width in enumerate(hidden):
        _positive_int(width, f"model.recipe.hidden[{i}]")


def _known_fields(section: dict, known: tuple[str, ...], where: str, what: str) -> None:
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise DaunceError(
            f"unknown field(s) {[f'{where}.{name}' for name in unknown]} for {what}; it takes "
            f"{list(known)}."
        )


def _positive_int(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DaunceError(f"{where} must be a positive integer; got {value!r}.")


def _check_factory(value: object, where: str) -> None:
    if not isinstance(value, str) or ":" not in value:
        raise DaunceError(f"{where} must be 'package.module:function'; got {value!r}.")


def check_columns(schema: Schema, where: str, task: dict, recipe: dict) -> None:
    """Refuse a source whose columns do not fit the task and recipe (schema and first row).

    ``where`` names the source's field (``data.train``, ``data.queries[1]``).
    """
    if schema.count == 0:
        raise DaunceError(
            f"{where}.path: data file {schema.path!r} has no examples; give it at least one."
        )
    for name, column in task_columns(task).items():
        _check_task_column(schema, where, name, column)
    kind = task.get("kind", "classification")
    if kind in LM_TASKS:
        if kind == "sequence_classification":
            _check_label_type(schema, where, task_columns(task)["label"])
        return
    if kind != "factory":
        _check_input(schema, where, task_columns(task)["input"], recipe)
    if kind == "classification":
        _check_label_type(schema, where, task_columns(task)["label"])
    if kind == "regression":
        _check_target_size(schema, where, task_columns(task)["target"], recipe)


def _check_task_column(schema: Schema, where: str, name: str, column: str) -> None:
    found = schema.columns.get(column)
    if found is None:
        raise DaunceError(
            f"task.{name} is {column!r}, but {where} ({schema.path}) has no column {column!r}; "
            f"it has {sorted(schema.columns)}. Set task.{name} to one of them, or map a column "
            f"to {column!r} with {where}.columns."
        )
    if name in TEXT_FIELDS:
        if found.numeric or found.shape:
            raise DaunceError(
                f"task.{name} is {column!r}, but that column of {where} ({schema.path}) holds "
                f"{found.dtype} values, not text; name a text column (one string per example)."
            )
        return
    if not found.numeric:
        raise DaunceError(
            f"task.{name} is {column!r}, but that column of {where} ({schema.path}) holds "
            f"{found.dtype} values, not numbers; encode it as numbers (or name another column)."
        )


def _check_input(schema: Schema, where: str, column: str, recipe: dict) -> None:
    if recipe.get("kind") not in ("mlp", "linear"):
        return
    found = schema.columns[column]
    inputs = recipe["inputs"]
    if found.shape != (inputs,):
        fix = f"{found.shape[0]}" if len(found.shape) == 1 else "the number of features"
        raise DaunceError(
            f"model.recipe.inputs is {inputs}, but each row of column {column!r} of {where} "
            f"({schema.path}) has {_row(found.shape)}; set model.recipe.inputs to {fix}, or "
            f"give {inputs} features per example."
        )
    if found.dtype.kind != "f":
        raise DaunceError(
            f"column {column!r} of {where} ({schema.path}) holds {found.dtype} values; the "
            f"{recipe['kind']} model takes floating-point features: cast it to float."
        )


def _row(shape: tuple[int, ...]) -> str:
    """One row's size in words: ``one number``, ``60 values``, ``shape (8, 8)``."""
    if not shape:
        return "one number"
    return f"{shape[0]} values" if len(shape) == 1 else f"shape {shape}"


def _check_label_type(schema: Schema, where: str, column: str) -> None:
    found = schema.columns[column]
    if found.dtype.kind not in "iu" or found.shape:
        kind = f"{found.dtype} values" + (f" of shape {found.shape}" if found.shape else "")
        raise DaunceError(
            f"task.label {column!r}: that column of {where} ({schema.path}) holds {kind}; "
            "classification takes one integer class label per example (0, 1, ..., C-1): cast "
            "the labels to integers, or use task.kind: regression for real-valued targets."
        )


def _check_target_size(schema: Schema, where: str, column: str, recipe: dict) -> None:
    outputs = recipe.get("outputs")
    size = int(np.prod(schema.columns[column].shape, dtype=np.int64))
    if recipe.get("kind") in ("mlp", "linear") and size != outputs:
        raise DaunceError(
            f"model.recipe.outputs is {outputs}, but task.target {column!r} of {where} "
            f"({schema.path}) has {size} value(s) per example; set model.recipe.outputs to "
            f"{size}."
        )


def check_splits(train: Schema, queries: Schema, where: str) -> None:
    """Refuse queries whose numeric columns differ from the training data's (first rows)."""
    try:
        check_compatible(_first_example(train), _first_example(queries))
    except DaunceError as error:
        raise DaunceError(
            f"{where} ({queries.path}) does not match data.train ({train.path}): {error}"
        ) from error


def _first_example(schema: Schema) -> dict[str, torch.Tensor]:
    """One example of zeros shaped and typed as the split's rows will be (floats: float32)."""
    example = {}
    for name, column in schema.columns.items():
        if column.numeric:
            values = torch.from_numpy(np.zeros((1, *column.shape), dtype=column.dtype))
            example[name] = values.float() if values.is_floating_point() else values
    return example


def check_labels(labels: np.ndarray, classes: int | None, where: str, source: DataSource) -> None:
    """Refuse missing class labels or labels outside ``0 .. classes-1`` (naming the rows)."""
    missing = np.flatnonzero(np.isnan(labels)) if labels.dtype.kind == "f" else []
    if len(missing):
        raise DaunceError(
            f"task.label: {where} ({source.path}) has no label in {len(missing)} row(s), first "
            f"rows {missing[:10].tolist()}; drop those examples or label them."
        )
    bad = np.flatnonzero((labels < 0) | (labels >= (classes or np.inf)))
    if len(bad):
        span = f"0..{classes - 1} (model.recipe.outputs = {classes})" if classes else ">= 0"
        raise DaunceError(
            f"task.label: {where} ({source.path}) holds labels outside {span} in {len(bad)} "
            f"row(s), first rows {bad[:10].tolist()} with labels {labels[bad[:10]].tolist()}; "
            "number the classes 0, 1, ..., C-1, or set model.recipe.outputs to C."
        )


def check_source(columns: dict[str, np.ndarray], source: DataSource) -> None:
    """Refuse a source with no numeric column, no example, or NaN/infinite values (by row).

    Used as `read_sources`' check when a split is prepared; row numbers count from 0 in the
    file ``source.path``.
    """
    numeric = {k: v for k, v in columns.items() if v.dtype.kind in NUMERIC}
    if not numeric and not any(is_text(v) for v in columns.values()):
        raise DaunceError(
            f"data file {source.path!r} has no numeric or text column (it has "
            f"{sorted(columns)}); the model's inputs and labels must be numbers, vectors of "
            "numbers, or (for language models) text."
        )
    if not numeric:
        return
    try:
        with warnings.catch_warnings():  # read-only arrays (Parquet): read here, never written
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            as_example_set(numeric, name=f"data file {source.path!r}")
    except TypeError as error:
        raise DaunceError(
            f"data file {source.path!r} holds a column torch cannot read ({error}); cast it to "
            "a float or integer type."
        ) from error

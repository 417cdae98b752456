"""In-memory example sets: a mapping of column name to tensor, one row per example.

An example set is the simplest form that serves every model we support: a torch classifier takes
``{"x": features, "y": labels}``, a language model ``{"input_ids": ..., "attention_mask": ...,
"labels": ...}``. Every tensor shares its first dimension (the example index), so selecting a batch
is one index operation, and selecting ``[G, B]`` indices gives one batch per perturbed copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from daunce_core.errors import DaunceError

ExampleSet = Mapping[str, torch.Tensor]


def as_example_set(data: Mapping[str, object], name: str = "data") -> dict[str, torch.Tensor]:
    """Validate ``data`` and return it as a dict of tensors (NumPy arrays are converted).

    Raises:
        DaunceError: not a mapping, empty, columns of different lengths, or NaN/inf values.
    """
    if not isinstance(data, Mapping) or not data:
        raise DaunceError(
            f"{name} must be a non-empty mapping of column name to tensor, e.g. "
            f"{{'x': features, 'y': labels}}; got {type(data).__name__}."
        )
    columns = {key: torch.as_tensor(value) for key, value in data.items()}
    lengths = {key: (col.shape[0] if col.dim() else None) for key, col in columns.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise DaunceError(
            f"{name} columns must all have one row per example (same first dimension); "
            f"got lengths {lengths}. Trim or pad the columns to the same number of examples."
        )
    if next(iter(lengths.values())) == 0:
        raise DaunceError(f"{name} has no examples; pass at least one example.")
    for key, col in columns.items():
        _check_finite(col, f"{name}[{key!r}]")
    return columns


def _check_finite(column: torch.Tensor, label: str) -> None:
    if not torch.is_floating_point(column):
        return
    bad = ~torch.isfinite(column.reshape(column.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:10].tolist()
        raise DaunceError(
            f"{label} holds NaN or infinite values in {int(bad.sum())} example(s), first rows "
            f"{rows}; drop or impute those examples before attribution."
        )


def check_compatible(train: ExampleSet, queries: ExampleSet) -> None:
    """Raise `DaunceError` unless ``queries`` has every column of ``train`` with the same row shape.

    Extra query columns are allowed (the model ignores what the task does not read).
    """
    for key, column in train.items():
        if key not in queries:
            raise DaunceError(
                f"queries lack the column {key!r} that train has; give both the same columns "
                f"(train: {sorted(train)}, queries: {sorted(queries)})."
            )
        mine, theirs = tuple(column.shape[1:]), tuple(queries[key].shape[1:])
        if mine != theirs or column.dtype != queries[key].dtype:
            raise DaunceError(
                f"queries[{key!r}] rows have shape {theirs} and dtype {queries[key].dtype}, but "
                f"train[{key!r}] rows have {mine} and {column.dtype}; encode both the same way."
            )


def num_examples(data: ExampleSet) -> int:
    """Number of examples (rows) in an example set."""
    return int(next(iter(data.values())).shape[0])


def take(data: ExampleSet, index: torch.Tensor | np.ndarray | slice) -> dict[str, torch.Tensor]:
    """Rows ``index`` of every column; an index ``[G, B]`` gives columns ``[G, B, ...]``."""
    if not isinstance(index, slice):
        index = torch.as_tensor(index, dtype=torch.long)
    return {key: col[index] for key, col in data.items()}


def cast_floating(data: ExampleSet, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating columns to ``dtype`` (labels and token ids keep their integer type)."""
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in data.items()}


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` rows covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))

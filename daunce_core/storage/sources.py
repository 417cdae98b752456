"""Users' data, read from Parquet, JSONL, NumPy files or a saved Hugging Face dataset.

Every source becomes one canonical form: an example set (column name → array, one row per
example) plus stable example ids (the source's id column, or the row position) and per-example
content digests. Columns holding vectors (Parquet lists/arrays, JSON arrays, NumPy arrays with
more than one dimension) become arrays with one row per example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daunce_core.errors import DaunceError

FORMATS = ("parquet", "jsonl", "npz", "hf")


@dataclass(frozen=True)
class DataSource:
    """Where a split of the data lives and how to read it.

    Attributes:
        path: a ``.parquet``, ``.jsonl``/``.json``, ``.npz`` file, or a folder written by
            ``datasets.Dataset.save_to_disk``.
        format: one of ``FORMATS``; None infers it from the path.
        columns: canonical name → source column (e.g. ``{"x": "pixels", "y": "label"}``);
            None keeps every column under its own name.
        id_column: a source column of unique integer example ids; None numbers rows from 0.
    """

    path: str
    format: str | None = None
    columns: dict[str, str] | None = field(default=None)
    id_column: str | None = None

    def resolved_format(self) -> str:
        """The format, inferred from the path when not given."""
        if self.format is not None:
            if self.format not in FORMATS:
                raise DaunceError(f"data format must be one of {FORMATS}; got {self.format!r}.")
            return self.format
        path = Path(self.path)
        if path.is_dir():
            return "hf"
        suffixes = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".npz": "npz"}
        if path.suffix not in suffixes:
            raise DaunceError(
                f"cannot tell the format of {self.path!r} from its suffix; name the format "
                f"(one of {FORMATS}) or use .parquet, .jsonl, .npz or a saved dataset folder."
            )
        return suffixes[path.suffix]


def _read_table(path: Path, fmt: str) -> dict[str, np.ndarray]:
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    if fmt == "hf":
        import datasets

        return dict(datasets.load_from_disk(str(path)).with_format("numpy")[:])
    import polars as pl

    frame = pl.read_parquet(path) if fmt == "parquet" else pl.read_ndjson(path)
    return {name: _series_to_numpy(frame[name]) for name in frame.columns}


def _series_to_numpy(series) -> np.ndarray:
    values = series.to_numpy()
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray | list):
        return np.stack([np.asarray(v) for v in values])
    return values


def read_source(source: DataSource) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read ``source`` into ``(columns, example_ids)``; ids are unique int64.

    Raises:
        DaunceError: a missing file, an unknown column, or duplicate ids.
    """
    path = Path(source.path)
    if not path.exists():
        raise DaunceError(f"data file {source.path!r} does not exist; check the path.")
    table = _read_table(path, source.resolved_format())
    ids = _example_ids(table, source)
    wanted = source.columns or {name: name for name in table if name != source.id_column}
    missing = sorted(set(wanted.values()) - set(table))
    if missing:
        raise DaunceError(
            f"{source.path!r} has no column(s) {missing}; it has {sorted(table)}. "
            "Fix the column mapping."
        )
    return {name: np.asarray(table[column]) for name, column in wanted.items()}, ids


def read_sources(sources: list[DataSource]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read several sources of one split and concatenate them in order.

    A source without an id column numbers its rows after the largest id read so far, so that
    appending a source (new queries) keeps every earlier id.

    Raises:
        DaunceError: sources with different columns, or ids repeated across sources.
    """
    parts, ids, next_id = [], [], 0
    for source in sources:
        columns, own = read_source(source)
        own = own + next_id if source.id_column is None else own
        next_id = int(own.max()) + 1 if len(own) else next_id
        parts.append(columns)
        ids.append(own)
    if any(set(p) != set(parts[0]) for p in parts):
        raise DaunceError(
            "the sources of one split must have the same columns; got "
            f"{[sorted(p) for p in parts]}."
        )
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    all_ids = np.concatenate(ids)
    if len(np.unique(all_ids)) != len(all_ids):
        raise DaunceError("example ids repeat across the sources of one split; make them unique.")
    return merged, all_ids


def _example_ids(table: dict[str, np.ndarray], source: DataSource) -> np.ndarray:
    count = len(next(iter(table.values())))
    if source.id_column is None:
        return np.arange(count, dtype=np.int64)
    if source.id_column not in table:
        raise DaunceError(f"id_column {source.id_column!r} is not a column of {source.path!r}.")
    ids = np.asarray(table[source.id_column]).astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DaunceError(f"id_column {source.id_column!r} of {source.path!r} has duplicates.")
    return ids


def write_canonical(columns: dict[str, np.ndarray], ids: np.ndarray, folder: str | Path) -> dict:
    """Write one split in canonical form; return its digest, size and column shapes.

    ``folder/examples.npz`` holds the columns (row i = example ``ids[i]``);
    ``folder/index.parquet`` the ids, per-example content digests and scalar columns (to join
    on ``example_id`` in SQL).
    """
    import polars as pl

    from daunce_core.storage.digest import digest_arrays, digest_rows

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "examples.partial.npz"
    np.savez(partial, __ids__=ids, **columns)
    partial.replace(folder / "examples.npz")
    index = {"example_id": ids, "digest": digest_rows(columns)}
    index.update({k: v for k, v in columns.items() if v.ndim == 1})
    pl.DataFrame(index).write_parquet(folder / "index.parquet")
    return {
        "digest": digest_arrays({**columns, "__ids__": ids}),
        "count": len(ids),
        "shapes": {k: list(v.shape[1:]) for k, v in columns.items()},
    }


def read_canonical(folder: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a split written by `write_canonical`: ``(columns, example_ids)``."""
    with np.load(Path(folder) / "examples.npz", allow_pickle=False) as archive:
        columns = {k: archive[k] for k in archive.files if k != "__ids__"}
        return columns, archive["__ids__"]

"""Users' data, read from Parquet, JSONL, NumPy files or a saved Hugging Face dataset.

Every source becomes one canonical form: an example set (column name → array, one row per
example) plus stable example ids (the source's id column, or the row position) and per-example
content digests. Columns holding vectors (Parquet lists/arrays, JSON arrays, NumPy arrays with
more than one dimension) become arrays with one row per example; vectors of different lengths
are refused. Only numeric columns enter the example set: other columns (text, for instance) are
kept in the index as scalars, or left out.

`describe_source` reads a source's schema and first row only (the checks of a configuration
when it loads); `read_column` one column.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daunce_core.errors import DaunceError

FORMATS = ("parquet", "jsonl", "npz", "hf")
NUMERIC = "biuf"
"""NumPy dtype kinds of the columns an example set holds: bool, integers, floats."""


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


@dataclass(frozen=True)
class Column:
    """One column's type and the shape of one row (``()`` for scalars)."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def numeric(self) -> bool:
        """Whether the column can enter an example set (bool, integer or float values)."""
        return self.dtype.kind in NUMERIC


@dataclass(frozen=True)
class Schema:
    """A source's columns (canonical names) and its number of rows (None: not known yet)."""

    path: str
    count: int | None
    columns: dict[str, Column]


def _unreadable() -> tuple[type[BaseException], ...]:
    """The errors of a file that is not what its format says (not an I/O failure)."""
    import polars as pl
    import pyarrow as pa

    return (
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        FileNotFoundError,
        pl.exceptions.PolarsError,
        pa.ArrowException,
    )


@contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Report a file its reader cannot parse as a `DaunceError` naming the file and format."""
    try:
        yield
    except DaunceError:
        raise
    except _unreadable() as error:
        raise DaunceError(
            f"cannot read {str(path)!r} as {fmt} ({type(error).__name__}: {error}); check that "
            f"it is a valid {fmt} file, or name its format (one of {FORMATS})."
        ) from error


def _read_table(path: Path, fmt: str, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every column of a file (or only ``columns``), as NumPy arrays."""
    with _reading(path, fmt):
        if fmt == "npz":
            return _read_npz(path, columns)
        if fmt == "hf":
            return _read_hf(path, columns)
        import polars as pl

        if fmt == "parquet":
            frame = pl.read_parquet(path, columns=columns)
        else:
            frame = _read_ndjson(path.read_bytes())
            frame = frame.select(columns) if columns is not None else frame
        return _frame_to_table(frame, path)


def _read_ndjson(content: bytes):
    import polars as pl

    if not content.strip():
        return pl.DataFrame()
    return pl.read_ndjson(io.BytesIO(content))


def _read_npz(path: Path, columns: list[str] | None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file; object arrays (pickled) are left out, never unpickled."""
    headers = _npz_headers(path)
    names = [n for n in headers if headers[n].dtype.kind != "O" and (not columns or n in columns)]
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in names}


def _read_hf(path: Path, columns: list[str] | None) -> dict[str, np.ndarray]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if columns is not None:
        dataset = dataset.select_columns(columns)
    table = dataset.with_format("numpy")[:]
    return {name: _to_numpy(values, name, path) for name, values in table.items()}


def _frame_to_table(frame, path: Path) -> dict[str, np.ndarray]:
    return {name: _to_numpy(frame[name].to_numpy(), name, path) for name in frame.columns}


def _to_numpy(values, column: str, path: Path) -> np.ndarray:
    """A column as one array: vectors (lists, arrays) stacked into rows, or refused if ragged."""
    values = np.asarray(values) if not isinstance(values, list) else _object_array(values)
    if values.dtype != object:
        return values
    first = next((v for v in values if v is not None), None)
    if not isinstance(first, np.ndarray | list):
        return values
    _check_vectors(values, column, path)
    return np.stack([np.asarray(v) for v in values])


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _check_vectors(values: np.ndarray, column: str, path: Path) -> None:
    """Refuse a column of vectors with a missing row or rows of different lengths."""
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise DaunceError(
            f"column {column!r} of {str(path)!r} has no vector in {len(missing)} row(s), first "
            f"rows {missing[:10]}; drop those examples or fill them in."
        )
    lengths = np.array([len(v) for v in values])
    ragged = np.flatnonzero(lengths != lengths[0])
    if len(ragged):
        raise DaunceError(
            f"column {column!r} of {str(path)!r} holds vectors of different lengths: row 0 has "
            f"{lengths[0]} values, row {ragged[0]} has {lengths[ragged[0]]} ({len(ragged)} "
            f"row(s) differ from row 0, first rows {ragged[:10].tolist()}); every example's "
            "vector must have the same length: pad or trim them, or drop those examples."
        )


def _existing(source: DataSource) -> Path:
    path = Path(source.path)
    if not path.exists():
        raise DaunceError(f"data file {source.path!r} does not exist; check the path.")
    return path


def _wanted(names: list[str], source: DataSource) -> dict[str, str]:
    """Canonical name → source column, checked against the columns ``names`` the file has."""
    wanted = source.columns or {name: name for name in names if name != source.id_column}
    missing = sorted(set(wanted.values()) - set(names))
    if missing:
        raise DaunceError(
            f"{source.path!r} has no column(s) {missing}; it has {sorted(names)}. "
            "Fix the column mapping."
        )
    if source.id_column is not None and source.id_column not in names:
        raise DaunceError(f"id_column {source.id_column!r} is not a column of {source.path!r}.")
    return wanted


def read_source(source: DataSource) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read ``source`` into ``(columns, example_ids)``; ids are unique int64.

    Raises:
        DaunceError: a missing, unreadable or empty file, an unknown column, ragged vectors, or
            duplicate ids.
    """
    path = _existing(source)
    table = _read_table(path, source.resolved_format())
    if not table or not len(next(iter(table.values()))):
        raise DaunceError(
            f"data file {source.path!r} has no examples; give it at least one example (row)."
        )
    wanted = _wanted(list(table), source)
    ids = _example_ids(table, source)
    return {name: np.asarray(table[column]) for name, column in wanted.items()}, ids


Check = Callable[[dict[str, np.ndarray], DataSource], None]
"""A check of one source's columns, called as each source is read (`read_sources`)."""


def read_sources(
    sources: list[DataSource], check: Check | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read several sources of one split and concatenate them in order.

    A source without an id column numbers its rows after the largest id read so far, so that
    appending a source (new queries) keeps every earlier id. ``check`` (if given) sees each
    source's columns before they are concatenated, so that its errors name the file and row.

    Raises:
        DaunceError: sources with different columns, or ids repeated across sources.
    """
    parts, ids, next_id = [], [], 0
    for source in sources:
        columns, own = read_source(source)
        if check is not None:
            check(columns, source)
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
    ids = np.asarray(table[source.id_column]).astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DaunceError(f"id_column {source.id_column!r} of {source.path!r} has duplicates.")
    return ids


def describe_source(source: DataSource) -> Schema:
    """The columns and size of ``source`` from its schema and first row only.

    Parquet: the schema and first row; JSONL: the first line (its size stays unknown unless it
    is empty); NPZ: the arrays' headers; a saved dataset: its first row.

    Raises:
        DaunceError: a missing or unreadable file, or a column mapping naming absent columns.
    """
    path = _existing(source)
    fmt = source.resolved_format()
    with _reading(path, fmt):
        count, columns = _PEEKS[fmt](path)
    wanted = _wanted(list(columns), source)
    return Schema(source.path, count, {name: columns[col] for name, col in wanted.items()})


def _first_rows(table: dict[str, np.ndarray]) -> dict[str, Column]:
    return {name: Column(values.dtype, tuple(values.shape[1:])) for name, values in table.items()}


def _peek_parquet(path: Path) -> tuple[int | None, dict[str, Column]]:
    import polars as pl
    import pyarrow.parquet as pq

    count = pq.ParquetFile(path).metadata.num_rows
    return count, _first_rows(_frame_to_table(pl.read_parquet(path, n_rows=1), path))


def _peek_jsonl(path: Path) -> tuple[int | None, dict[str, Column]]:
    with open(path, "rb") as handle:
        line = next((line for line in handle if line.strip()), b"")
    frame = _read_ndjson(line)
    return (None if line else 0), _first_rows(_frame_to_table(frame, path))


def _peek_npz(path: Path) -> tuple[int | None, dict[str, Column]]:
    headers = _npz_headers(path)
    counts = [column.shape[0] for column in headers.values() if column.shape]
    columns = {name: Column(c.dtype, c.shape[1:]) for name, c in headers.items()}
    return (counts[0] if counts else 0), columns


def _npz_headers(path: Path) -> dict[str, Column]:
    """Each array's dtype and whole shape, from its ``.npy`` header (no data is read)."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as handle:
                major, _ = np.lib.format.read_magic(handle)
                read = np.lib.format.read_array_header_1_0
                if major != 1:
                    read = np.lib.format.read_array_header_2_0
                shape, _, dtype = read(handle)
            headers[member.removesuffix(".npy")] = Column(np.dtype(dtype), tuple(shape))
    return headers


def _peek_hf(path: Path) -> tuple[int | None, dict[str, Column]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    first = dataset.select(range(min(1, len(dataset)))).with_format("numpy")[:]
    table = {name: _to_numpy(values, name, path) for name, values in first.items()}
    return len(dataset), _first_rows(table)


_PEEKS = {"parquet": _peek_parquet, "jsonl": _peek_jsonl, "npz": _peek_npz, "hf": _peek_hf}


def read_column(source: DataSource, name: str) -> np.ndarray:
    """Every value of one column of ``source`` (``name`` is its canonical name)."""
    column = (source.columns or {}).get(name, name)
    path = _existing(source)
    return _read_table(path, source.resolved_format(), [column])[column]


def is_text(values: np.ndarray) -> bool:
    """Whether a column holds one string per example (a language model's prompts, texts)."""
    if values.ndim != 1:
        return False
    if values.dtype.kind == "U":
        return True
    return values.dtype == object and all(isinstance(v, str) for v in values)


def write_canonical(
    columns: dict[str, np.ndarray], ids: np.ndarray, folder: str | Path, text: Sequence[str] = ()
) -> dict:
    """Write one split in canonical form; return its digest, size and column shapes.

    ``folder/examples.npz`` holds the numeric columns and the ``text`` columns a language
    model reads (fixed-width unicode, never pickled), row i = example ``ids[i]``;
    ``folder/index.parquet`` the ids, per-example content digests and scalar columns, all text
    included (to join on ``example_id`` in SQL). Other columns are left out. The digests cover
    the numeric and ``text`` columns; the shapes the numeric ones.
    """
    import polars as pl

    from daunce_core.storage.digest import digest_arrays, digest_rows

    numeric = {k: v for k, v in columns.items() if v.dtype.kind in NUMERIC}
    for name in text:  # np.asarray(dtype=str) would turn a missing value into "None"
        missing = [i for i, v in enumerate(columns[name].tolist()) if not isinstance(v, str)]
        if missing:
            raise DaunceError(
                f"the text column {name!r} has missing (null) or non-text values in rows "
                f"{missing[:5]}{' …' if len(missing) > 5 else ''}; every example needs its "
                "text: fill or drop those rows."
            )
    texts = {k: np.asarray(columns[k].tolist(), dtype=str) for k in text}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "examples.partial.npz"
    np.savez(partial, __ids__=ids, **numeric, **texts)
    partial.replace(folder / "examples.npz")
    index = [pl.Series("example_id", ids), pl.Series("digest", digest_rows(numeric | texts))]
    index += [_index_column(k, v) for k, v in columns.items() if v.ndim == 1 and _scalar(v)]
    pl.DataFrame(index).write_parquet(folder / "index.parquet")
    return {
        "digest": digest_arrays({**numeric, **texts, "__ids__": ids}),
        "count": len(ids),
        "shapes": {k: list(v.shape[1:]) for k, v in numeric.items()},
    }


def _scalar(values: np.ndarray) -> bool:
    """Whether a column can be an index column: numbers, text or dates, one per example."""
    if values.dtype.kind in NUMERIC + "UM":
        return True
    return values.dtype == object and all(isinstance(v, str) or v is None for v in values)


def _index_column(name: str, values: np.ndarray):
    """A scalar column of the index; text (Python strings, missing ones too) as strings."""
    import polars as pl

    if values.dtype == object:
        return pl.Series(name, values.tolist(), dtype=pl.String)
    return pl.Series(name, values)


def read_canonical(folder: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a split written by `write_canonical`: ``(columns, example_ids)``."""
    with np.load(Path(folder) / "examples.npz", allow_pickle=False) as archive:
        columns = {k: archive[k] for k in archive.files if k != "__ids__"}
        return columns, archive["__ids__"]

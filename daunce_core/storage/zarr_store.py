"""The Zarr arrays of one run (loss matrices, scores) and of retraining outcomes.

Layout under a run's store folder (NaN fill, so unwritten rows show):

==================  =============  ===========================================================
array               shape          chunks / meaning
==================  =============  ===========================================================
``losses_train``    ``(K, n)``     ``(1, 65536)``: row k = copy k's loss on every train example
``losses_query``    ``(K, m)``     ``(1, 65536)``: row k = copy k's measurement on every query
``scores``          ``(n, m)``     ``scores[i, j]`` = influence of train i on query j
``self_influence``  ``(n,)``       variance of each training loss over the valid copies
                                   (subspace scores: ``(1/n) A_iᵀ Q⁺ A_i``)
``reflected_train`` ``(K, n)``     subspace scores only: losses of the reflection ``θ0 − Δ_k``
``reflected_query`` ``(K, m)``     its measurements on the queries
``output_changes``  ``(K, n_c, D)`` ``(1, n_c, D)``: copy k's output change ``dz`` on the
                                   curvature examples (`daunce_core.storage.reflections`)
``curved_changes``  ``(K, n_c, D)`` ``H dz``, the loss's output Hessian applied to it
==================  =============  ===========================================================

Losses are stored in the run's dtype (float32 or float64), scores in float32. Each copy owns
the chunks of its own row, so copies written by different workers never share a chunk; whether
a row is complete is its copy's record (`daunce_core.storage.records`), written after the row.
Zarr writes each chunk to a temporary file and renames it into place; a killed writer can leave
an orphan ``*.partial`` file (`daunce_core.storage.layout.remove_partials`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from daunce_core.errors import DaunceError

PENDING, DONE = 0, 1
LOSSES = ("losses_train", "losses_query")
REFLECTED = ("reflected_train", "reflected_query")
CHANGES = ("output_changes", "curved_changes")
ROW_CHUNK = 65536


class RowPrefix:
    """The leading ``count`` rows of a 2-d array (read-only view, sliced like the array)."""

    def __init__(self, array, count: int) -> None:
        self.array, self.count = array, min(count, array.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(count, columns)``."""
        return (self.count, self.array.shape[1])

    @property
    def dtype(self):
        """The array's dtype."""
        return self.array.dtype

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice):
            rows = slice(*rows.indices(self.count))
            key = (rows, *key[1:]) if isinstance(key, tuple) else rows
        return self.array[key]


class RunStore:
    """Zarr arrays of one run, under ``root`` (a local path; created on first use)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        """Whether array ``name`` has been created."""
        return (self.root / name / "zarr.json").exists()

    def open(self, name: str, mode: str = "r") -> zarr.Array:
        """Open array ``name`` (``mode`` ``"r"`` or ``"r+"``)."""
        if not self.exists(name):
            raise DaunceError(f"the run store {self.root} has no array {name!r} yet.")
        return zarr.open_array(store=self._path(name), mode=mode)

    def _create(self, name: str, shape: tuple, chunks: tuple, dtype: str, fill) -> zarr.Array:
        return zarr.create_array(
            store=self._path(name),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill,
            overwrite=True,
        )

    def ensure(self, num_models: int, n: int, m: int, dtype: str = "float32") -> None:
        """Create the loss arrays for ``num_models`` copies, or resize them.

        The arrays never shrink: a run asking for fewer copies than stored keeps the others
        (its scores read the first ``num_models`` rows, `losses`). The number of queries may
        change (each copy's record says which queries its row covers). An array whose metadata
        is damaged is made again (`_repair`).

        Raises:
            DaunceError: a different number of training examples.
        """
        self._repair()
        stored = [self.open(name).shape[0] for name in LOSSES if self.exists(name)]
        rows = max([num_models, *stored])
        for name, width in (("losses_train", n), ("losses_query", m)):
            if not self.exists(name):
                chunks = (1, max(1, min(width, ROW_CHUNK)))
                self._create(name, (rows, width), chunks, dtype, np.nan)
        stored_k, stored_n = self.open("losses_train").shape
        if n != stored_n:
            raise DaunceError(
                f"the run holds losses for {stored_n} training examples, the data has {n}; "
                "different training data makes a different run: give it another name."
            )
        for name, width in (("losses_train", n), ("losses_query", m)):
            array = self.open(name, "r+")
            shape = (max(num_models, stored_k), width)  # K never shrinks: copies are kept
            if array.shape != shape:
                array.resize(shape)

    def ensure_reflections(
        self, num_models: int, n: int, m: int, changes: tuple[int, ...], dtype: str = "float32"
    ) -> None:
        """Create (or grow) the subspace scores' arrays beside the loss arrays.

        ``changes``: the shape ``(n_c, D...)`` of one copy's output changes. An array that
        cannot be read, or whose shape no longer fits (other curvature examples), is made
        again: the copies' markers then send them to be measured again.
        """
        widths = {"reflected_train": (n,), "reflected_query": (m,)}
        widths |= {name: tuple(changes) for name in CHANGES}
        for name, tail in widths.items():
            kind = "float32" if name in CHANGES else dtype
            self._ensure_rows(name, num_models, tail, kind, resizable=name == "reflected_query")

    def _ensure_rows(
        self, name: str, num_models: int, tail: tuple, dtype: str, resizable: bool
    ) -> None:
        array = None
        if (self.root / name).exists():
            try:
                array = self.open(name, "r+")
            except Exception:
                shutil.rmtree(self.root / name)
        if array is not None and array.shape[1:] != tail and not resizable:
            shutil.rmtree(self.root / name)
            array = None
        if array is None:
            chunks = (1, *(max(1, min(w, ROW_CHUNK)) for w in tail[:1]), *tail[1:])
            self._create(name, (num_models, *tail), chunks, dtype, np.nan)
            return
        shape = (max(num_models, array.shape[0]), *tail)
        if array.shape != shape:
            array.resize(shape)

    def _repair(self) -> list[str]:
        """Remove loss arrays whose metadata cannot be read; return their names.

        Their rows are then missing, and each copy's record sends it to be measured again.
        """
        damaged = []
        for name in LOSSES:
            if (self.root / name).exists():
                try:
                    self.open(name)
                except Exception:
                    shutil.rmtree(self.root / name)
                    damaged.append(name)
        return damaged

    def losses(self, name: str, num_models: int) -> RowPrefix:
        """The first ``num_models`` rows of loss array ``name`` (a run may hold more copies)."""
        return RowPrefix(self.open(name), num_models)

    def check_copies_key(self, copies_key: str, legacy: tuple[str, ...] = ()) -> None:
        """Tie the stored rows to the inputs that made them (``copies_key``); refuse others.

        ``legacy``: the same inputs' keys as earlier versions wrote them (with paths); rows
        stored under one are taken, and their key rewritten.
        """
        train = self.open("losses_train", "r+")
        stored = train.attrs.get("copies_key")
        if stored is not None and stored not in (copies_key, *legacy):
            raise DaunceError(
                f"the copies stored in {self.root} were made from other inputs (base model, "
                "training data or settings changed under the same run folder); rerun with "
                "--overwrite to start this run over."
            )
        train.attrs["copies_key"] = copies_key

    def read_row(self, k: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``k`` of both loss arrays (the first ``queries`` query columns)."""
        train = np.asarray(self.open("losses_train")[k])
        query = np.asarray(self.open("losses_query")[k, :queries])
        return train, query

    def write_rows(self, ks, train: np.ndarray, query: np.ndarray) -> None:
        """Write rows ``ks`` of both loss arrays (``query`` may cover the leading columns)."""
        a, b = self.open("losses_train", "r+"), self.open("losses_query", "r+")
        for row, k in enumerate(ks):
            a[k] = train[row].astype(a.dtype)
            b[k, : query.shape[1]] = query[row].astype(b.dtype)

    def write_query_columns(self, k: int, start: int, values: np.ndarray) -> None:
        """Write query columns ``start:`` of row ``k`` (new queries)."""
        array = self.open("losses_query", "r+")
        array[k, start : start + len(values)] = values.astype(array.dtype)

    def create_scores(self, n: int, m: int, row_chunk: int, col_chunk: int) -> zarr.Array:
        """A fresh ``scores`` array ``(n, m)`` whose chunks are the scoring tiles."""
        return self._create(
            "scores", (n, m), (min(row_chunk, n), min(col_chunk, m)), "float32", np.nan
        )

    def write_self_influence(self, values: np.ndarray) -> None:
        """Store the ``[n]`` self-influence vector."""
        array = self._create(
            "self_influence", values.shape, (min(len(values), ROW_CHUNK),), "float32", np.nan
        )
        array[:] = values.astype(np.float32)


class OutcomeStore:
    """Outcomes of models retrained from scratch (LDS ground truth, subset removal), in Zarr.

    A grid of jobs — ``(M, S)`` subsets × seeds for the LDS, ``(J,)`` for subset removal — each
    with its outcome on every query. Under the store's folder:

    * ``outcomes``, shape ``grid + (m,)``, float32, one chunk per job: what each retrained model
      measured on each query (lower is better: loss, negated margin, or 0/1 error);
    * ``status``, shape ``grid``, int8, one chunk per job: 1 once the job's outcomes are written.

    As in `RunStore`, every job owns its chunks and its status is written last, so a job killed
    mid-write is still pending. The grid may grow along any axis (more subsets, more seeds)
    without touching the jobs already done. ``key`` (the digest of everything the outcomes
    depend on) is kept in the attributes; a store made for other inputs is refused.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def exists(self) -> bool:
        """Whether the store has been created."""
        return all((self.root / name / "zarr.json").exists() for name in ("outcomes", "status"))

    def open(self, name: str, mode: str = "r") -> zarr.Array:
        """Open ``outcomes`` or ``status``."""
        if not self.exists():
            raise DaunceError(f"no retraining outcomes in {self.root} yet.")
        return zarr.open_array(store=str(self.root / name), mode=mode)

    def ensure(self, grid: tuple[int, ...], m: int, key: str) -> None:
        """Create the arrays for ``grid`` jobs on ``m`` queries, or grow them to ``grid``.

        Raises:
            DaunceError: the store holds outcomes of other inputs, or on other queries.
        """
        if not self.exists():
            ones = (1,) * len(grid)
            status = zarr.create_array(
                store=str(self.root / "status"),
                shape=grid,
                chunks=ones,
                dtype="int8",
                fill_value=PENDING,
                overwrite=True,
            )
            status.attrs["key"] = key
            zarr.create_array(
                store=str(self.root / "outcomes"),
                shape=(*grid, m),
                chunks=(*ones, max(m, 1)),
                dtype="float32",
                fill_value=np.nan,
                overwrite=True,
            )
            return
        status, outcomes = self.open("status", "r+"), self.open("outcomes", "r+")
        if status.attrs.get("key") != key or outcomes.shape[-1] != m:
            raise DaunceError(
                f"the retraining outcomes in {self.root} were made from other inputs (data, "
                "model recipe, training recipe or outcome); delete that folder to start over."
            )
        if len(grid) != status.ndim:
            raise DaunceError(f"job grid {grid} does not match the stored {status.shape}.")
        grown = tuple(max(a, b) for a, b in zip(grid, status.shape, strict=True))
        if grown != status.shape:
            status.resize(grown)
            outcomes.resize((*grown, m))

    def write_subsets(self, masks: np.ndarray) -> None:
        """Store the LDS subsets beside the outcomes: ``subsets``, ``[M, n]`` bool."""
        array = zarr.create_array(
            store=str(self.root / "subsets"),
            shape=masks.shape,
            chunks=(1, masks.shape[1]),
            dtype="bool",
            overwrite=True,
        )
        array[:] = masks

    def status(self) -> np.ndarray:
        """The status grid (0 pending, 1 done)."""
        return np.asarray(self.open("status")[...])

    def write(self, index: tuple[int, ...], values: np.ndarray) -> None:
        """Write job ``index``'s outcomes, then mark it done."""
        self.open("outcomes", "r+")[index] = np.asarray(values, dtype=np.float32)
        self.open("status", "r+")[index] = DONE

    def outcomes(self, grid: tuple[int, ...] | None = None) -> np.ndarray:
        """The outcomes of the leading ``grid`` jobs (default all); every one must be done."""
        status = self.status()
        region = tuple(slice(0, g) for g in (grid or status.shape))
        if (status[region] != DONE).any():
            raise DaunceError(f"{int((status[region] != DONE).sum())} jobs are not done yet.")
        return np.asarray(self.open("outcomes")[region], dtype=np.float64)

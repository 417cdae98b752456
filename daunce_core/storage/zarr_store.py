"""The Zarr arrays of one run: loss matrices, per-copy completion marks, scores.

Layout under the store's folder (float32 losses and scores, NaN fill so unwritten rows show):

==================  =============  ===========================================================
array               shape          chunks / meaning
==================  =============  ===========================================================
``losses_train``    ``(K, n)``     ``(1, 65536)``: row k = copy k's loss on every train example
``losses_query``    ``(K, m)``     ``(1, 65536)``: row k = copy k's measurement on every query
``copy_status``     ``(K,)``       ``(1,)``: 0 pending, 1 done, 2 diverged (written after rows)
``queries_done``    ``(K,)``       ``(1,)``: how many leading query columns row k holds
``scores``          ``(n, m)``     ``scores[i, j]`` = influence of train i on query j
``self_influence``  ``(n,)``       variance of each training loss over the valid copies
==================  =============  ===========================================================

Each copy owns the chunks of its own row and its own status chunk, so copies written by
different workers never share a chunk; the status is written last, so a copy killed mid-write is
simply still pending. Zarr writes each chunk to a temporary file and renames it into place; a
killed writer can leave an orphan ``*.partial`` file, which `RunStore.remove_partials` clears.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from daunce_core.errors import DaunceError
from daunce_core.storage.digest import digest_json

PENDING, DONE, DIVERGED = 0, 1, 2
ARRAYS = ("losses_train", "losses_query", "queries_done", "copy_status")
ROW_CHUNK = 65536


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

    def ensure(self, num_models: int, n: int, m: int) -> None:
        """Create the loss arrays for ``num_models`` copies, or resize them.

        K may only grow (copies are never dropped); the number of queries may change (the
        flow re-measures the query columns when the queries changed, `check_inputs`).

        Raises:
            DaunceError: fewer copies than stored, or a different number of training examples.
        """
        if not all(self.exists(name) for name in ARRAYS):
            # Created together; a kill between two creations leaves no copy done, so start over.
            self._create("losses_train", (num_models, n), (1, min(n, ROW_CHUNK)), "float32", np.nan)
            self._create("losses_query", (num_models, m), (1, min(m, ROW_CHUNK)), "float32", np.nan)
            self._create("queries_done", (num_models,), (1,), "int64", 0)
            self._create("copy_status", (num_models,), (1,), "int8", PENDING)
            return
        stored_k, stored_n = self.open("losses_train").shape
        if num_models < stored_k:
            raise DaunceError(
                f"the run holds {stored_k} perturbed copies; num_models={num_models} would drop "
                f"some. Set daunce.num_models to at least {stored_k} (e.g. after `daunce extend`)."
            )
        if n != stored_n:
            raise DaunceError(
                f"the run holds losses for {stored_n} training examples, the data has {n}; "
                "different training data makes a different run: give it another name."
            )
        self._grow(num_models, n, m)

    def _grow(self, num_models: int, n: int, m: int) -> None:
        for name, shape in (
            ("losses_train", (num_models, n)),
            ("losses_query", (num_models, m)),
            ("copy_status", (num_models,)),
            ("queries_done", (num_models,)),
        ):
            array = self.open(name, "r+")
            if array.shape != shape:
                array.resize(shape)

    def check_inputs(self, copies_key: str, query_digests: list[str]) -> bool:
        """Tie the stored rows to the inputs that made them; return True if queries were reset.

        ``copies_key`` digests everything the copies depend on (base model, training data,
        settings). Rows made from other inputs are refused, with the fix. ``query_digests`` are
        the per-example digests of the current queries, in order: if the queries the rows hold
        are not a prefix of them (the query file changed), every row's query columns are marked
        unevaluated, so they are measured again from the stored copies.
        """
        train, query = self.open("losses_train", "r+"), self.open("losses_query", "r+")
        stored = train.attrs.get("copies_key")
        if stored is not None and stored != copies_key:
            raise DaunceError(
                f"the copies stored in {self.root} were made from other inputs (base model, "
                "training data or settings changed under the same run folder); rerun with "
                "--overwrite to start this run over."
            )
        train.attrs["copies_key"] = copies_key
        count = int(query.attrs.get("queries_count", 0))
        held = digest_json(query_digests[:count])
        reset = count > 0 and (count > len(query_digests) or query.attrs.get("queries") != held)
        if reset:
            done = self.open("queries_done", "r+")
            done[:] = np.zeros(done.shape, dtype=np.int64)
        query.attrs.update(
            {"queries": digest_json(query_digests), "queries_count": len(query_digests)}
        )
        return reset

    def status(self, ks=None) -> np.ndarray:
        """Status of copies ``ks`` (default all), int8: 0 pending, 1 done, 2 diverged.

        Each copy's status is its own chunk (so writers never share one): reading all of them
        costs one read per copy, so pass ``ks`` when only some are needed.
        """
        return self._read("copy_status", ks)

    def queries_done(self, ks=None) -> np.ndarray:
        """How many leading query columns the rows of copies ``ks`` (default all) hold."""
        return self._read("queries_done", ks)

    def _read(self, name: str, ks) -> np.ndarray:
        array = self.open(name)
        if ks is None:
            return np.asarray(array[:])
        return np.asarray(array.get_orthogonal_selection(np.asarray(ks, dtype=np.int64)))

    def write_rows(self, ks, train: np.ndarray, query: np.ndarray, diverged: np.ndarray) -> None:
        """Write rows ``ks`` of both loss arrays, then mark them done (or diverged)."""
        a, b = self.open("losses_train", "r+"), self.open("losses_query", "r+")
        status, counts = self.open("copy_status", "r+"), self.open("queries_done", "r+")
        for row, k in enumerate(ks):
            a[k] = train[row].astype(np.float32)
            b[k, : query.shape[1]] = query[row].astype(np.float32)
            counts[k] = query.shape[1]
            status[k] = DIVERGED if diverged[row] else DONE

    def write_query_columns(self, k: int, start: int, values: np.ndarray) -> None:
        """Write query columns ``start:`` of row ``k`` (new queries), then record the count."""
        self.open("losses_query", "r+")[k, start : start + len(values)] = values.astype(np.float32)
        self.open("queries_done", "r+")[k] = start + len(values)

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

    def remove_partials(self) -> list[str]:
        """Delete orphan temporary files left by a killed writer; return their paths."""
        return remove_partials(self.root)


TEMPORARY = ("*.partial", "*.partial.*", ".tmp*")
"""Names of temporary files: zarr chunks and our Parquet/NPZ writes (``*.partial``),
safetensors saves (``.tmp*``). Each is renamed into place when complete."""


def remove_partials(folder: str | Path) -> list[str]:
    """Delete orphan temporary files (`TEMPORARY`) below ``folder``; return their paths."""
    folder = Path(folder)
    if not folder.exists():
        return []
    orphans = sorted(
        {str(p) for pattern in TEMPORARY for p in folder.rglob(pattern) if p.is_file()}
    )
    for path in orphans:
        Path(path).unlink(missing_ok=True)
    return orphans


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

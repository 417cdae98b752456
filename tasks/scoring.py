"""Scores out of core into Zarr, and the Parquet exports users query."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.errors import DaunceError, DaunceWarning
from daunce_core.method.scores import (
    collect_statistics,
    constant_columns,
    self_influence,
    warn_constant,
    write_scores,
)
from daunce_core.method.subspace import valid_copies, write_subspace_scores
from daunce_core.storage.digest import digest_json
from daunce_core.storage.exports import example_influence_table, top_table, write_parquet
from daunce_core.storage.layout import RunLayout
from daunce_core.storage.reflections import subspace_curvature
from daunce_core.storage.zarr_store import CHANGES, LOSSES, REFLECTED, RunStore
from tasks.common import artifact, copy_access

ROW_CHUNK, COL_CHUNK = 8192, 1024


@task(name="scores", cache_policy=NO_CACHE)
def compute_scores(
    run_dir: str,
    kind: str,
    rows_digest: str,
    num_models: int,
    queries: str | None = None,
    spec: dict | None = None,
) -> dict:
    """Scores ``[n_train, m_query]`` from the valid loss rows; self-influence ``[n_train]``.

    ``rows_digest`` (of which copies are done) keys the cache: new rows, new scores. The first
    ``num_models`` copies are scored (a run may hold more, after ``daunce extend``).
    ``queries`` (the canonical query folder; how to name them, not part of the key) gives the
    query ids the warnings name. The record's ``warnings`` hold the `DaunceWarning`s raised:
    copies left out, and measurements that do not vary across the copies
    (``constant``: `daunce_core.method.scores.constant_message`), counted in ``constant_queries``
    and ``constant_train``. ``kind`` ``subspace`` reads the copies' reflections too and needs the
    copy ``spec`` (`_subspace_scores`).
    """
    store = RunStore(RunLayout(run_dir).store)
    a, b = store.losses("losses_train", num_models), store.losses("losses_query", num_models)
    ids = None
    if queries is not None:
        ids = pl.read_parquet(Path(queries) / "index.parquet")["example_id"].to_numpy()
        ids = ids if len(ids) == b.shape[1] else None
    constant = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DaunceWarning)
        stats = collect_statistics(a, b)
        if len(stats.valid_rows) >= 2:
            constant = warn_constant(stats, b.dtype, ids)
        if kind == "subspace":
            valid, own = _subspace_scores(run_dir, num_models, spec)
        else:
            valid = stats.valid_rows
    constant_train, constant_queries = constant_columns(stats)
    n, m = a.shape[1], b.shape[1]
    inputs = [store.root / name for name in LOSSES]
    if kind == "subspace":
        inputs += [store.root / name for name in (*REFLECTED, *CHANGES)]
    else:
        out = store.create_scores(n, m, ROW_CHUNK, COL_CHUNK)
        write_scores(a, b, stats, out, kind=kind, row_chunk=ROW_CHUNK, col_chunk=COL_CHUNK)
        own = self_influence(stats)
    store.write_self_influence(own)
    digest = digest_json({"rows": rows_digest, "kind": kind})
    record = artifact(
        store.root / "scores", "scores", digest, "scores", inputs=inputs, shape=[n, m]
    )
    return record | {
        "companions": [str(store.root / "self_influence")],
        "valid": len(valid),
        "excluded": sorted(set(range(a.shape[0])) - set(valid.tolist())),
        "warnings": [str(w.message) for w in caught],
        "constant": constant,
        "constant_queries": len(constant_queries),
        "constant_train": len(constant_train),
    }


def _subspace_scores(run_dir: str, num_models: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """``S = (1/n) Aᵀ Q⁺ B`` out of core into the store; the valid copies and self-influence.

    Copies with a non-finite value in any of their rows (diverged, or a reflection whose loss
    overflowed) are left out with a warning; ``Q`` is formed over the others
    (`daunce_core.storage.reflections.subspace_curvature`).
    """
    layout = RunLayout(run_dir)
    store = RunStore(layout.store)
    arrays = [store.losses(name, num_models) for name in (*LOSSES, *REFLECTED)]
    changes = [store.open(name) for name in CHANGES]
    valid = valid_copies(*arrays, *changes, count=num_models)
    excluded = np.flatnonzero(~valid)
    if len(excluded):
        warnings.warn(
            f"perturbed copies {excluded.tolist()} have non-finite losses (theirs or their "
            "reflection's) and are left out of the scores.",
            DaunceWarning,
            stacklevel=2,
        )
    if not valid.any():
        raise DaunceError(
            "no copy has finite losses and reflections to score; lower the learning rate or "
            "rho and run again."
        )
    curvature = subspace_curvature(copy_access(spec), layout, valid)
    train, query = (arrays[0], arrays[2]), (arrays[1], arrays[3])
    out = store.create_scores(train[0].shape[1], query[0].shape[1], ROW_CHUNK, COL_CHUNK)
    _, own = write_subspace_scores(
        train, query, curvature, valid, out, row_chunk=ROW_CHUNK, col_chunk=COL_CHUNK
    )
    return np.flatnonzero(valid), own


@task(name="exports", cache_policy=NO_CACHE)
def export_tables(run_dir: str, run_id: str, scores: dict, splits: dict, top_k: int) -> list[dict]:
    """Top-k proponents and opponents per query, per-example aggregates, the example index.

    ``splits`` maps ``train`` and ``queries`` to their canonical data records.
    """
    layout = RunLayout(run_dir)
    store = RunStore(layout.store)
    matrix = store.open("scores")
    train_ids, query_ids = (
        pl.read_parquet(Path(splits[split]["uri"]) / "index.parquet")["example_id"].to_numpy()
        for split in ("train", "queries")
    )
    examples = pl.concat(
        [
            pl.read_parquet(Path(splits[split]["uri"]) / "index.parquet").with_columns(
                split=pl.lit(split)
            )
            for split in ("train", "queries")
        ],
        how="diagonal_relaxed",
    ).with_columns(run_id=pl.lit(run_id))
    tables = {
        "examples": examples,
        "top_proponents": top_table(matrix, run_id, train_ids, query_ids, top_k, largest=True),
        "top_opponents": top_table(matrix, run_id, train_ids, query_ids, top_k, largest=False),
        "example_influence": example_influence_table(
            matrix, np.asarray(store.open("self_influence")[:]), run_id, train_ids
        ),
    }
    return [
        artifact(
            write_parquet(frame, layout.export(name)),
            f"export/{name}",
            digest_json({"scores": scores["digest"], "name": name, "k": top_k}),
            "exports",
            inputs=[scores["uri"]],
            shape=[frame.height],
        )
        for name, frame in tables.items()
    ]

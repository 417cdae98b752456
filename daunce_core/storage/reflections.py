"""Reflected copies in the pipeline: what the subspace scores need beyond the loss rows.

With ``score: subspace`` (DESIGN §1, `daunce_core.method.subspace`), every copy that is done
also has, in the run's store (`daunce_core.storage.zarr_store`): the losses and query
measurements of its reflection ``θ0 − Δ_k`` (``reflected_train``, ``reflected_query``: rows of
``A⁻`` and ``B⁻``), and its two curvature factors on the curvature examples (``output_changes``,
``curved_changes``: ``dz`` and ``H dz``, `Task.curvature_factors`), from which ``Q`` is formed
across copies that different tasks measured. They are measured from the saved copy (loss
evaluation only, no training), after the copy's own loss row. An API run's copies cannot be
reflected: their rows hold the one-sided stand-ins and their factors on curvature probes sampled
from θ0 once per run (`RunReflections.prepare`, ``store/probes.json``,
`daunce_core.access.api.probes`).

Copy k's marker, ``store/reflections/copy-000007.json``, is written after its rows: the digest
of the copy's parameters it was measured from, the queries it covers, the digest of the probes
(if any) and the digest of its rows. A copy retrained (other parameters), new or changed
queries, other probes, or damaged rows send it to be measured again; a diverged copy has NaN
rows. The scores need every done copy's parameters (``Q``'s parameter part), so a lost or
damaged parameter file is trained again first (a deterministic kind: the same copy; an API copy
is found again from its recorded job). Markers are written atomically, one file per copy, by
the one task that owns the copy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from daunce_core.access.base import CopyLosses, ModelAccess
from daunce_core.errors import DaunceError
from daunce_core.method.subspace import output_gram
from daunce_core.storage.copies import RunCopies, rows_digest
from daunce_core.storage.digest import digest_file, digest_json
from daunce_core.storage.layout import RunLayout
from daunce_core.storage.records import CopyRecords
from daunce_core.storage.zarr_store import CHANGES, REFLECTED, RunStore


@dataclasses.dataclass
class ReflectionReport:
    """What a `RunReflections.complete` call did.

    Copies measured, diverged (NaN rows), and retrained because their parameter files were lost
    (`RunCopies.restore_params`).
    """

    ks: list[int]
    measured: list[int] = dataclasses.field(default_factory=list)
    diverged: list[int] = dataclasses.field(default_factory=list)
    retrained: list[int] = dataclasses.field(default_factory=list)


class RunReflections:
    """The reflected measurements of one run's copies, reached through ``access``.

    Args:
        access: the run's model access (it must offer ``measure_reflections``).
        run: the run's layout.
        query_digests: per-example digests of the run's queries, in order.
    """

    def __init__(self, access: ModelAccess, run: RunLayout, query_digests: Sequence[str]) -> None:
        if not hasattr(access, "measure_reflections"):
            raise DaunceError(
                f"score: subspace needs copies that can be reflected (θ0 − Δ_k) and measured; "
                f"the {access.kind!r} access cannot. Use score: covariance or correlation."
            )
        self.access, self.run = access, run
        self.store = RunStore(run.store)
        self.records = CopyRecords(run.copies)
        self.query_digests = list(query_digests)
        self.queries_key = digest_json(self.query_digests)
        self.markers = run.store / "reflections"
        self.probes = run.store / "probes.json"

    def prepare(self) -> None:
        """Make what every copy's reflection is measured against, once per run.

        Nothing for copies that are reflected; an API run's curvature probes, sampled from θ0
        and kept in ``store/probes.json`` (`daunce_core.access.api.probes`). Run once before
        the groups are measured, so that they all use the same probes.
        """
        self.access.prepare_reflections(self.probes, self.queries_key)

    def _probes_key(self) -> str | None:
        return digest_file(self.probes) if self.probes.is_file() else None

    def complete(self, ks: Sequence[int]) -> ReflectionReport:
        """Measure the reflections of copies ``ks`` that are not measured and intact."""
        report = ReflectionReport(ks=[int(k) for k in ks])
        copies = RunCopies(self.access, self.run, self.query_digests)
        report.retrained = copies.restore_params(report.ks)
        self.prepare()  # reads what the run made (`prepare`)
        probes = self._probes_key()
        todo, digests = [], {}
        for k in report.ks:
            record = self.records.read(k)
            digests[k] = record.params_digest
            if record.status != "done":
                report.diverged.append(k)
                if self._marker(k).get("status") != "diverged":
                    self._write_diverged(k)
            elif not self._intact(k, record.params_digest, probes):
                todo.append(k)
        if todo:
            paths = [self.run.copy(k, self.access.copy_suffix) for k in todo]
            rows = [self.store.read_row(k, len(self.query_digests)) for k in todo]
            losses = CopyLosses(
                np.asarray(todo),
                np.stack([train for train, _ in rows]),
                np.stack([query for _, query in rows]),
                np.zeros(len(todo), dtype=bool),
            )
            parts = self.access.measure_reflections(self.access.load_copies(paths), losses)
            for g, k in enumerate(todo):
                self._write(k, parts.train[g], parts.query[g], parts.changes[g], parts.curved[g])
                fields = {"status": "done", "params_digest": digests[k], "probes": probes}
                self._write_marker(k, fields)
            report.measured = todo
        return report

    @staticmethod
    def marker_digest_of(run: RunLayout, num_models: int) -> str:
        """Digest of the first ``num_models`` copies' markers (what the scores read)."""
        return digest_json([_read_marker(run, k) for k in range(num_models)])

    def _marker_path(self, k: int) -> Path:
        return _marker_path(self.run, k)

    def _marker(self, k: int) -> dict:
        return _read_marker(self.run, k)

    def _rows(self, k: int) -> list[np.ndarray]:
        names = (*REFLECTED, *CHANGES)
        return [np.asarray(self.store.open(name)[k]) for name in names]

    def _intact(self, k: int, params_digest: str | None, probes: str | None) -> bool:
        marker = self._marker(k)
        if (
            marker.get("params_digest") != params_digest
            or marker.get("queries") != self.queries_key
            or marker.get("probes") != probes
        ):
            return False
        try:
            return rows_digest(*self._rows(k)) == marker.get("rows_digest")
        except Exception:
            return False

    def _write(self, k: int, train, query, changes, curved) -> None:
        for name, values in zip(
            (*REFLECTED, *CHANGES), (train, query, changes, curved), strict=True
        ):
            array = self.store.open(name, "r+")
            array[k] = np.asarray(values).astype(array.dtype)

    def _write_diverged(self, k: int) -> None:
        for name in (*REFLECTED, *CHANGES):
            array = self.store.open(name, "r+")
            array[k] = np.full(array.shape[1:], np.nan, dtype=array.dtype)
        self._write_marker(k, {"status": "diverged", "params_digest": None})

    def _write_marker(self, k: int, fields: dict) -> None:
        marker = fields | {
            "queries": self.queries_key,
            "rows_digest": rows_digest(*self._rows(k)),
        }
        self.markers.mkdir(parents=True, exist_ok=True)
        path = self._marker_path(k)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(marker))
        partial.replace(path)


def _marker_path(run: RunLayout, k: int) -> Path:
    return run.store / "reflections" / f"copy-{k:06d}.json"


def _read_marker(run: RunLayout, k: int) -> dict:
    try:
        return json.loads(_marker_path(run, k).read_text())
    except (OSError, ValueError):
        return {}


def subspace_curvature(
    access: ModelAccess, run: RunLayout, valid: np.ndarray, block: int = 64
) -> np.ndarray:
    """``Q`` of the ``valid`` copies: the stored output Gram plus ``λ Δ_kᵀ Δ_l`` from the copies.

    The output part reads each copy's stored ``dz`` and ``H dz``; the parameter part loads the
    saved copies ``block`` at a time (``access.load_copies``) against ``θ0`` (``access.anchor``),
    ``λ`` the copies' proximal strength (``access.prox``).
    """
    store = RunStore(run.store)
    ks = np.flatnonzero(valid)
    changes, curved = (np.asarray(store.open(name).oindex[ks]) for name in CHANGES)
    gram = output_gram(changes, curved)
    if access.prox:
        gram = gram + access.prox * _parameter_gram(access, run, ks, block)
    return gram


def _parameter_gram(access, run: RunLayout, ks: np.ndarray, block: int) -> np.ndarray:
    """``Δ_kᵀ Δ_l`` of copies ``ks``, loading ``block`` copies (two blocks) at a time."""
    gram = np.zeros((len(ks), len(ks)))
    starts = range(0, len(ks), block)

    def deltas(start: int):
        paths = [run.copy(int(k), access.copy_suffix) for k in ks[start : start + block]]
        params = access.load_copies(paths).params
        return np.concatenate(
            [
                (p - access.anchor[name]).reshape(p.shape[0], -1).double().cpu().numpy()
                for name, p in params.items()
            ],
            axis=1,
        )

    for i in starts:
        left = deltas(i)
        for j in starts:
            if j < i:
                continue
            right = left if j == i else deltas(j)
            product = left @ right.T
            gram[i : i + len(left), j : j + len(right)] = product
            gram[j : j + len(right), i : i + len(left)] = product.T
    return gram

"""A run's perturbed copies on disk: train, record, verify and resume them by index.

`RunCopies.complete(ks)` brings copies ``ks`` to done, whatever state a killed or damaged run
left them in, and does only the work that is missing — for any `ModelAccess` kind:

* a copy with no finished record is trained (alone or with the other unfinished copies of
  ``ks``; a copy does not depend on which copies share its group);
* a finished copy whose loss row no longer matches its record's digest (a deleted or damaged
  chunk) is measured again from its saved parameters — no training;
* a finished copy whose row covers other queries than the run's (queries added or changed) is
  measured on the missing query columns from its saved parameters;
* a copy whose saved parameters are needed but lost or damaged is trained again only when the
  access is deterministic (and the report says so); otherwise a `DaunceError` names the file;
* a damaged record is an unfinished copy for a deterministic access, and named otherwise.

Each step writes the loss row first and the copy's record last, so a kill at any point leaves
the copy unfinished or finished, never half-recorded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daunce_core.access.base import CopiesFailed, ModelAccess
from daunce_core.errors import DaunceError
from daunce_core.storage.digest import digest_file, digest_json
from daunce_core.storage.layout import RunLayout, copy_file
from daunce_core.storage.records import CopyRecord, CopyRecords, now
from daunce_core.storage.zarr_store import RunStore


@dataclass
class CopyReport:
    """What `RunCopies.complete` did to copies ``ks``."""

    ks: list[int]
    trained: list[int] = field(default_factory=list)
    retrained_lost: list[int] = field(default_factory=list)
    remeasured: list[int] = field(default_factory=list)
    queries_added_to: list[int] = field(default_factory=list)
    diverged: list[int] = field(default_factory=list)
    params_missing: list[int] = field(default_factory=list)


class RecordJournal:
    """A `CopyJournal` over the copies' records: a job id is written the moment it exists."""

    def __init__(self, store: CopyRecords, records: dict[int, CopyRecord]) -> None:
        self.store, self.records = store, records

    def job_id(self, k: int) -> str | None:
        """The external job recorded for copy ``k``, if any."""
        return self.records[k].job_id

    def record_job(self, k: int, job_id: str, counts: dict[str, int] | None = None) -> None:
        """Write copy ``k``'s job id into its record now (another attempt if it is new).

        ``counts`` (what creating it cost) are added in the same write: a kill cannot keep
        the one without the other.
        """
        record = self.records[k]
        record.job_id, record.job_state = job_id, "created"
        if job_id not in record.jobs:
            record.jobs.append(job_id)
        if counts:
            record.usage = _add_counts(record.usage or {}, counts)
        self.store.write(record)

    def jobs(self, k: int) -> list[str]:
        """Every job recorded for copy ``k``, oldest first."""
        return list(self.records[k].jobs)

    def record_job_state(self, k: int, state: str, message: str | None = None) -> None:
        """Write the state of copy ``k``'s current job (and why, if it failed)."""
        record = self.records[k]
        record.job_state = f"{state}: {message}" if message else state
        self.store.write(record)

    def record_usage(self, k: int, counts: dict[str, int]) -> None:
        """Add ``counts`` to copy ``k``'s recorded usage and write the record now."""
        record = self.records[k]
        record.usage = _add_counts(record.usage or {}, counts)
        self.store.write(record)

    def recorded_usage(self, k: int) -> dict[str, int]:
        """What copy ``k``'s record says it cost so far."""
        return dict(self.records[k].usage or {})

    def state_file(self, k: int) -> Path:
        """Copy ``k``'s work in progress, beside its record: ``copy-000007.state.json``."""
        return copy_file(self.store.folder, k, ".state.json")


def _add_counts(old: dict, new: dict) -> dict:
    """Usage counts of earlier attempts plus this process's."""
    return {name: old.get(name, 0) + new.get(name, 0) for name in {*old, *new}}


def rows_digest(*rows: np.ndarray) -> str:
    """Digest of one copy's rows, in order.

    Its train losses and query measurements; or its reflection's rows
    (`daunce_core.storage.reflections`).
    """
    hasher = hashlib.sha256()
    for values in rows:
        hasher.update(np.ascontiguousarray(values).tobytes())
    return hasher.hexdigest()


class RunCopies:
    """The copies of one run, reached through ``access``.

    Args:
        access: the model access that trains and evaluates copies.
        run: the run's layout (its ``store/`` and ``copies/`` folders).
        query_digests: per-example digests of the run's queries, in order.
    """

    def __init__(self, access: ModelAccess, run: RunLayout, query_digests: Sequence[str]) -> None:
        self.access, self.run = access, run
        self.store = RunStore(run.store)
        self.records = CopyRecords(run.copies)
        self.query_digests = list(query_digests)

    def complete(self, ks: Sequence[int]) -> CopyReport:
        """Bring copies ``ks`` to finished (see the module docstring); report what was done."""
        report = CopyReport(ks=[int(k) for k in ks])
        records = {k: self._read(k) for k in report.ks}
        finished = [k for k in report.ks if records[k].finished]
        damaged = [k for k in finished if not self._row_intact(records[k])]
        behind = [k for k in finished if k not in damaged and self._behind(records[k])]
        needs_params = [k for k in damaged + behind if records[k].status == "done"]
        lost = [k for k in needs_params if not self._params_intact(records[k])]
        lost = [k for k in lost if not self._recover(records[k])]
        self._refuse_lost(lost)
        todo = [k for k in report.ks if not records[k].finished] + lost
        if todo:
            self._train(sorted(todo), records, report)
            report.retrained_lost = lost
        remeasure = [k for k in damaged if k not in lost]
        self._remeasure(remeasure, records, report)
        self._add_queries([k for k in behind if k not in lost], records, report)
        report.diverged = [k for k in report.ks if records[k].status == "diverged"]
        report.params_missing = [
            k
            for k in report.ks
            if records[k].status == "done"
            and not self.run.copy(k, self.access.copy_suffix).exists()
        ]
        return report

    def restore_params(self, ks: Sequence[int]) -> list[int]:
        """Train again the done copies of ``ks`` whose parameter files are lost or damaged.

        For a step that needs the copies' parameters (the subspace scores' reflections) even
        when their loss rows are intact. A deterministic kind retrains them (the same copies);
        for the others the lost files are named. Returns the copies retrained.
        """
        records = {k: self._read(k) for k in ks}
        lost = [
            k for k in ks if records[k].status == "done" and not self._params_intact(records[k])
        ]
        lost = [k for k in lost if not self._recover(records[k])]
        self._refuse_lost(lost)
        if lost:
            self._train(sorted(lost), records, CopyReport(ks=sorted(lost)))
        return lost

    def _read(self, k: int) -> CopyRecord:
        """Copy ``k``'s record; a damaged one means an unfinished copy, if it is reproducible."""
        try:
            return self.records.read(k)
        except DaunceError:
            if not self.access.capabilities.deterministic:
                raise
            return CopyRecord(k=k, message="its record was damaged; trained again")

    def _row_intact(self, record: CopyRecord) -> bool:
        try:
            train, query = self.store.read_row(record.k, record.queries_done)
        except Exception:
            return False
        return rows_digest(train, query) == record.rows_digest

    def _behind(self, record: CopyRecord) -> bool:
        done = record.queries_done
        return done != len(self.query_digests) or record.queries_key != self._queries_key(done)

    def _queries_key(self, count: int) -> str:
        return digest_json(self.query_digests[:count])

    def _params_intact(self, record: CopyRecord) -> bool:
        path = self.run.copies / (record.params or "")
        if not record.params or not path.is_file():
            return False
        return digest_file(path) == record.params_digest

    def _recover(self, record: CopyRecord) -> bool:
        """Whether the access wrote a lost copy's file again (then its record names it)."""
        if record.status != "done" or self.access.capabilities.deterministic:
            return False  # a deterministic kind retrains it instead
        path = self.run.copy(record.k, self.access.copy_suffix)
        if not self.access.recover_copy(record, path):
            return False
        record.params, record.params_digest = path.name, digest_file(path)
        self.records.write(record)
        return True

    def _refuse_lost(self, lost: list[int]) -> None:
        if lost and not self.access.capabilities.deterministic:
            files = ", ".join(str(self.run.copy(k, self.access.copy_suffix)) for k in lost)
            raise DaunceError(
                f"the parameters of copies {lost} are lost or damaged ({files}), and a "
                f"{self.access.kind!r} copy cannot be reproduced from its seed; restore those "
                "files, or delete the copies' records to train new copies in their place."
            )

    def _train(self, ks: list[int], records: dict, report: CopyReport) -> None:
        started, began = time.perf_counter(), now()
        for k in ks:
            record = records[k]
            record.status, record.attempts, record.started_at = (
                "training",
                record.attempts + 1,
                began,
            )
            self.records.write(record)
        try:
            trained = self.access.train(ks, journal=RecordJournal(self.records, records))
        except CopiesFailed as failure:  # keep the copies that were trained, then stop
            if failure.ks:
                self._keep(failure.ks, failure.trained, records, started)
            raise
        self._keep(ks, trained, records, started)
        report.trained = ks

    def _keep(self, ks: list[int], trained, records: dict, started: float) -> None:
        """Measure trained copies ``ks``, save them, write their rows and records."""
        rows = self.access.evaluate(ks, trained)
        seconds = (time.perf_counter() - started) / len(ks)
        for g, k in enumerate(ks):
            self._save(trained, g, records[k])
            records[k].training = self.access.training_summary(trained, g)
        self._write_rows(ks, rows.train, rows.query, rows.diverged, records, seconds)

    def _save(self, trained, g: int, record: CopyRecord) -> None:
        path = self.run.copy(record.k, self.access.copy_suffix)
        self.access.save_copy(trained, g, path)
        record.params, record.params_digest = path.name, digest_file(path)

    def _write_rows(self, ks, train, query, diverged, records, seconds=None) -> None:
        self.store.write_rows(ks, train, query)
        for g, k in enumerate(ks):
            record = records[k]
            record.status = "diverged" if diverged[g] else "done"
            record.message = "non-finite objective, parameters or losses" if diverged[g] else None
            self._finish(record, query.shape[1], seconds)

    def _finish(self, record: CopyRecord, queries: int, seconds: float | None = None) -> None:
        train, query = self.store.read_row(record.k, queries)
        record.rows_digest = rows_digest(train, query)
        record.queries_done, record.queries_key = queries, self._queries_key(queries)
        record.finished_at = now()
        if seconds is not None:
            record.seconds = seconds
        usage = self.access.take_usage(record.k)
        if usage:
            record.usage = _add_counts(record.usage or {}, usage)
        self.records.write(record)

    def _load(self, ks: list[int]):
        return self.access.load_copies([self.run.copy(k, self.access.copy_suffix) for k in ks])

    def _remeasure(self, ks: list[int], records: dict, report: CopyReport) -> None:
        """Rows lost or damaged: measured again from the saved parameters (no training)."""
        live = [k for k in ks if records[k].status == "done"]
        if live:
            rows = self.access.evaluate(live, self._load(live))
            self._write_rows(live, rows.train, rows.query, rows.diverged, records)
        for k in ks:
            if records[k].status == "diverged":
                nan = np.full((1, len(self.query_digests)), np.nan)
                self.store.write_rows([k], np.full((1, self.access.num_train), np.nan), nan)
                self._finish(records[k], len(self.query_digests))
        report.remeasured = ks

    def _add_queries(self, ks: list[int], records: dict, report: CopyReport) -> None:
        """Rows that cover other queries than the run's: measure the missing columns."""
        m = len(self.query_digests)
        starts = {k: self._valid_prefix(records[k]) for k in ks}
        for start in sorted(set(starts.values())):
            group = [k for k in ks if starts[k] == start and records[k].status == "done"]
            if group and start < m:
                values = self.access.measure_queries(self._load(group), start)
                for g, k in enumerate(group):
                    self.store.write_query_columns(k, start, values[g])
        for k in ks:
            if records[k].status == "diverged":
                self.store.write_query_columns(k, 0, np.full(m, np.nan))
            self._finish(records[k], m)
        report.queries_added_to = ks

    def _valid_prefix(self, record: CopyRecord) -> int:
        """How many leading query columns of the row are still the run's queries."""
        done = min(record.queries_done, len(self.query_digests))
        return done if record.queries_key == self._queries_key(record.queries_done) else 0

"""Per-copy records: the one "done" signal of each perturbed copy (DESIGN §3, storage).

Copy ``k`` has a small JSON record beside its parameters (``copies/copy-000007.json``): its
status, how many attempts it took, when, the external job id of an API fine-tune (written
*before* waiting for the job, so a killed run never submits a second job), where its parameters
live and their digest, and the digest of the loss row it wrote with the queries that row covers.
Resume reads the records: only copies that are not done are trained, a damaged row is measured
again from its parameters, and a copy whose parameters are lost is retrained only when the
model access is deterministic — otherwise the lost file is named.

Records are written atomically (a ``.partial`` file renamed into place); each copy's record is
written by the one task that owns the copy, so writers never share a file.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from daunce_core.errors import DaunceError
from daunce_core.storage.layout import copy_file

STATUSES = ("pending", "training", "done", "diverged")
"""``training`` is written when a copy starts (with its attempt count and job id, if any);
``done`` and ``diverged`` after its loss row is written."""

FINISHED = ("done", "diverged")


@dataclass
class CopyRecord:
    """What is known of perturbed copy ``k``.

    Attributes:
        k: the copy's index.
        status: one of `STATUSES`.
        attempts: how many times training started.
        started_at, finished_at: ISO times (UTC) of the last attempt.
        seconds: the last attempt's duration (training and evaluation of its group, shared).
        job_id: the external fine-tuning job of this copy (API access), else None.
        jobs: every external job created for this copy, oldest first (its attempts).
        job_state: the last state the server reported for ``job_id``, and why if it failed.
        usage: what the copy cost (requests, retries, tokens trained and queried; API access).
        training: how the copy's training went, where the kind trains in process: its learning
            rate (the value ``lr: auto`` chose), steps, and with a ``tolerance`` its last
            relative gradient residual and whether it converged.
        params: the file holding the copy's parameters or adapter (name in the copies folder).
        params_digest: SHA-256 of that file.
        rows_digest: digest of the copy's loss row (train losses and the covered queries).
        queries_done: how many leading query columns the row holds.
        queries_key: digest of those queries' per-example digests, in order.
        message: why the copy diverged, or what happened to it last.
    """

    k: int
    status: str = "pending"
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    job_id: str | None = None
    jobs: list[str] = dataclasses.field(default_factory=list)
    job_state: str | None = None
    usage: dict | None = None
    training: dict | None = None
    params: str | None = None
    params_digest: str | None = None
    rows_digest: str | None = None
    queries_done: int = 0
    queries_key: str | None = None
    message: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the copy is done or diverged (its loss row is written)."""
        return self.status in FINISHED


def now() -> str:
    """The current time, ISO format, UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CopyRecords:
    """The records of a run's copies, one JSON file each under ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, k: int) -> Path:
        """The record file of copy ``k``."""
        return copy_file(self.folder, k, ".json")

    def read(self, k: int) -> CopyRecord:
        """Copy ``k``'s record; a copy never started is ``pending``.

        Raises:
            DaunceError: the record file is damaged (names it and the fix).
        """
        path = self.path(k)
        if not path.exists():
            return CopyRecord(k=k)
        try:
            record = CopyRecord(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise DaunceError(
                f"the record of copy {k} ({path}) is damaged ({error}); delete it to train that "
                "copy again."
            ) from error
        if record.k != k or record.status not in STATUSES:
            raise DaunceError(f"the record {path} does not describe copy {k}; delete it.")
        return record

    def read_many(self, ks) -> list[CopyRecord]:
        """The records of copies ``ks``, in order."""
        return [self.read(int(k)) for k in ks]

    def write(self, record: CopyRecord) -> None:
        """Write ``record`` atomically."""
        path = self.path(record.k)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(dataclasses.asdict(record), indent=1))
        partial.replace(path)

    def counts(self, num_models: int) -> dict[str, int]:
        """How many of copies ``0..num_models-1`` are in each status (damaged ones: ``damaged``)."""
        counts: Counter = Counter()
        for k in range(num_models):
            try:
                counts[self.read(k).status] += 1
            except DaunceError:
                counts["damaged"] += 1
        return {status: counts[status] for status in (*STATUSES, "damaged") if counts[status]}

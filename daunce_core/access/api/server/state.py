"""The server's persistent state: uploaded files, fine-tuning jobs, their events and adapters.

Everything lives under the work folder, so a restarted server with the same folder lists the
same files, jobs and models::

    files/<file id>.json        the file object          files/<file id>.data   its bytes
    jobs/<job id>.json          the job object (plus private fields starting with "_")
    events/<job id>.jsonl       the job's events, one JSON object a line, oldest first
    adapters/<job id>/          the fine-tuned LoRA adapter (peft layout, safetensors)
    models/<preset>/            preset base models built or converted once

JSON files are written to a temporary name and renamed into place (atomic on POSIX).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

from daunce_core.errors import DaunceError

log = logging.getLogger("daunce.api.server")


def new_id(prefix: str) -> str:
    """A fresh id such as ``file-3f9a...`` (24 random hex digits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` atomically (temporary file, fsync, rename)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def public(record: dict) -> dict:
    """A record without its private fields (names starting with ``_``)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class Store:
    """Files, jobs and events under ``workdir`` (thread-safe)."""

    def __init__(self, workdir: str | Path) -> None:
        self.root = Path(workdir)
        for sub in ("files", "jobs", "events", "adapters", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # files -----------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        """Store an upload; returns its file object."""
        record = {
            "id": new_id("file"),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        data = self.root / "files" / f"{record['id']}.data"
        partial = data.with_name(data.name + ".partial")
        partial.write_bytes(content)
        partial.replace(data)
        write_json(self.root / "files" / f"{record['id']}.json", record)
        return record

    def file(self, file_id: str) -> dict | None:
        """The file object, or None if there is no such file."""
        return self._read(self.root / "files", file_id)

    def files(self) -> list[dict]:
        """All file objects, oldest first."""
        return self._all(self.root / "files")

    def file_content(self, file_id: str) -> bytes:
        """The bytes of an uploaded file."""
        return (self.root / "files" / f"{file_id}.data").read_bytes()

    def delete_file(self, file_id: str) -> bool:
        """Remove a file; False if there was none."""
        with self._lock:
            meta = self.root / "files" / f"{file_id}.json"
            if not _safe(file_id) or not meta.exists():
                return False
            meta.unlink()
            (self.root / "files" / f"{file_id}.data").unlink(missing_ok=True)
            return True

    # jobs ------------------------------------------------------------------------------------
    def save_job(self, job: dict) -> dict:
        """Write a job record (whole)."""
        with self._lock:
            write_json(self.root / "jobs" / f"{job['id']}.json", job)
        return job

    def update_job(self, job_id: str, *, unless: tuple[str, ...] = (), **changes) -> dict | None:
        """Change some fields of a job record and write it; returns the new record.

        Nothing changes (and None is returned) if the job's status is one of ``unless``: the
        check and the write are one step, so a cancellation is never overwritten.
        """
        with self._lock:
            job = self.job(job_id)
            if job is None:
                raise DaunceError(f"no fine-tuning job {job_id!r} in {self.root}.")
            if job["status"] in unless:
                return None
            job.update(changes)
            return self.save_job(job)

    def job(self, job_id: str) -> dict | None:
        """The job record (private fields included), or None."""
        return self._read(self.root / "jobs", job_id)

    def jobs(self) -> list[dict]:
        """All job records, oldest first."""
        return self._all(self.root / "jobs")

    # events ----------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, data: dict | None = None, level="info"):
        """Append an event to a job's log."""
        event = {
            "id": new_id("ftevent"),
            "object": "fine_tuning.job.event",
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "data": data or {},
            "type": "metrics" if data else "message",
        }
        with self._lock, open(self.root / "events" / f"{job_id}.jsonl", "a") as handle:
            handle.write(json.dumps(event) + "\n")
        return event

    def events(self, job_id: str) -> list[dict]:
        """A job's events, oldest first."""
        path = self.root / "events" / f"{job_id}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().split("\n")  # not splitlines: JSON may hold U+2028
        return [json.loads(line) for line in lines if line.strip()]

    def clear_events(self, job_id: str) -> None:
        """Forget a job's events (it runs again from the start)."""
        (self.root / "events" / f"{job_id}.jsonl").unlink(missing_ok=True)

    # adapters --------------------------------------------------------------------------------
    def adapter(self, job_id: str) -> Path:
        """The folder of a job's adapter (may not exist)."""
        return self.root / "adapters" / job_id

    def delete_adapter(self, job_id: str) -> None:
        """Remove a job's adapter folder."""
        folder = self.adapter(job_id)
        if folder.exists():
            doomed = folder.with_name(folder.name + ".deleted")
            folder.replace(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # helpers ---------------------------------------------------------------------------------
    def _read(self, folder: Path, item: str) -> dict | None:
        path = folder / f"{item}.json"
        if not _safe(item) or not path.exists():
            return None
        return _load(path)

    def _all(self, folder: Path) -> list[dict]:
        records = [r for r in (_load(p) for p in folder.glob("*.json")) if r is not None]
        return sorted(records, key=lambda r: (r["created_at"], r.get("_seq", 0), r["id"]))


def _load(path: Path) -> dict | None:
    """A stored record; a damaged one is named in the log and left out (not fatal)."""
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "id" in record and "created_at" in record:
            return record
        problem = "not a record"
    except (OSError, ValueError) as error:
        problem = str(error)
    log.warning("%s is damaged (%s); it is left out: restore it, or delete it", path, problem)
    return None


def _safe(item: str) -> bool:
    """Whether an id can name a file (no path separators, no leading dot)."""
    return bool(item) and "/" not in item and "\\" not in item and not item.startswith(".")

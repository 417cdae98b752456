"""The workspace lock: one run at a time per workspace, taken before Prefect starts.

Kept apart from the flows (it imports no Prefect), so a command takes the lock before it starts
its Prefect server, and a second run in the same workspace is refused at once. The flows take it
too (for deployments and workers); in the thread that already holds it, taking it again is a
no-op, since a second ``flock`` on the same file would conflict even within one process.
"""

from __future__ import annotations

import fcntl
import threading
from contextlib import contextmanager
from pathlib import Path

from daunce_core.errors import DaunceError
from daunce_core.storage.layout import Workspace

_held = threading.local()


@contextmanager
def workspace_lock(workspace: str | Path):
    """Hold ``workspace`` for one run at a time (released by the OS if the process dies).

    Cleaning up orphan temporary files is safe only while no other run writes in the workspace.

    Raises:
        DaunceError: another process (or thread) is running in the workspace.
    """
    key = str(Path(workspace).resolve())
    held = getattr(_held, "paths", None) or set()
    if key in held:
        yield
        return
    Path(workspace).mkdir(parents=True, exist_ok=True)
    with open(Workspace(workspace).lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise DaunceError(
                f"another daunce run is working in {workspace}; wait for it to finish, or give "
                "this run another workspace."
            ) from error
        _held.paths = held | {key}
        try:
            yield
        finally:
            _held.paths = held
            fcntl.flock(handle, fcntl.LOCK_UN)

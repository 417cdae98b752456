"""Prepare data: a user's split read from its source, checked, and written in canonical form.

Also the retry condition of daunce's tasks (`retry_transient`): a bad input fails at once, and
only failures that another attempt may not meet (I/O, a full GPU) are retried.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.storage.sources import DataSource, read_sources, write_canonical
from daunce_core.storage.validate import check_source
from tasks.common import artifact

DETERMINISTIC_OS_ERRORS = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
"""I/O errors that another attempt meets again: a wrong path is no passing failure."""


def transient(error: BaseException | None) -> bool:
    """Whether another attempt may succeed where ``error`` failed.

    Only I/O failures (`OSError`: timeouts, lost connections, a full or flaky disk; not a
    missing file or a refused permission) and a GPU out of memory are; a `DaunceError` or
    `TaskError` (bad input or configuration), any other `ValueError` or `TypeError`, and
    everything else are deterministic.
    """
    if isinstance(error, DETERMINISTIC_OS_ERRORS):
        return False
    if isinstance(error, OSError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def retry_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn`` of daunce's tasks: retry `transient` failures only.

    Prefect passes the failed state; a task that raised holds the exception as its data.
    """
    return transient(getattr(state, "data", None))


@task(
    name="prepare-data",
    task_run_name="prepare-data-{split}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
)
def prepare_data(sources: list[dict], split: str, folder: str, content_digest: str) -> dict:
    """Read one split (``train`` or ``queries``) from its sources; write it in canonical form.

    Each source is checked as it is read (`daunce_core.storage.validate.check_source`: it has
    examples, its numeric columns are finite; errors name the file, column and rows), so that
    bad data fails here, before any training. ``content_digest`` (of the source files) is part
    of the cache key: new content, new work.
    """
    columns, ids = read_sources([DataSource(**source) for source in sources], check=check_source)
    meta = write_canonical(columns, ids, folder)
    record = artifact(
        folder,
        f"data/{split}",
        meta["digest"],
        "prepare-data",
        inputs=[source["path"] for source in sources],
        shape=[meta["count"]],
    )
    return record | {"count": meta["count"], "shapes": meta["shapes"], "split": split}

"""Prepare data: a user's split read from its source and written in canonical form."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.storage.sources import DataSource, read_sources, write_canonical
from tasks.common import artifact


@task(
    name="prepare-data",
    task_run_name="prepare-data-{split}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
)
def prepare_data(sources: list[dict], split: str, folder: str, content_digest: str) -> dict:
    """Read one split (``train`` or ``queries``) from its sources; write it in canonical form.

    ``content_digest`` (of the source files) is part of the cache key: new content, new work.
    """
    columns, ids = read_sources([DataSource(**source) for source in sources])
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

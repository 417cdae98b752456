"""Prepare data: a user's split read from its source, checked, and written in canonical form."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from daunce_core.errors import DaunceError
from daunce_core.storage.sources import DataSource, read_sources, write_canonical
from daunce_core.storage.validate import check_source
from tasks.common import artifact, retry_transient


@task(
    name="prepare-data",
    task_run_name="prepare-data-{split}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
)
def prepare_data(
    sources: list[dict], split: str, folder: str, content_digest: str, text: list[str] | None = None
) -> dict:
    """Read one split (``train`` or ``queries``) from its sources; write it in canonical form.

    Each source is checked as it is read (`daunce_core.storage.validate.check_source`: it has
    examples, its numeric columns are finite; errors name the file, column and rows), so that
    bad data fails here, before any training. ``content_digest`` (of the source files) is part
    of the cache key: new content, new work. ``text`` names the text columns a language model
    reads (kept with the numeric columns; `daunce_core.storage.sources.write_canonical`).
    """
    columns, ids = read_sources([DataSource(**source) for source in sources], check=check_source)
    missing = [name for name in text or [] if name not in columns]
    if missing:
        raise DaunceError(
            f"the {split} data has no text column(s) {missing}; it has {sorted(columns)}. Name "
            "existing columns in the task section."
        )
    meta = write_canonical(columns, ids, folder, text=text or ())
    record = artifact(
        folder,
        f"data/{split}",
        meta["digest"],
        "prepare-data",
        inputs=[source["path"] for source in sources],
        shape=[meta["count"]],
    )
    return record | {"count": meta["count"], "shapes": meta["shapes"], "split": split}

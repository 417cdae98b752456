"""Fan a task out over groups of work on the flow's task runner, printing progress.

One loop for every mapped step of the flows: the perturbed copies, the LDS ground truth and the
subset-removal retrainings. Each maps only the groups that still have work; each item's own done
signal (a copy's record, a retraining's status in its Zarr store) tells which those are.
"""

from __future__ import annotations

from prefect import unmapped
from prefect.futures import as_completed


def groups_of(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive groups of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def map_groups(task, groups: list[list], label: str, done: int, total: int, **shared) -> list:
    """Map ``task`` over ``groups`` (``shared`` keyword arguments are the same for all).

    Prints ``<label>: <done>/<total> ready`` as each group finishes (``done`` counts the items
    finished before). Returns ``(group, result, state name)`` per group, in finishing order.
    """
    if not groups:
        return []
    futures = task.map(groups, **{name: unmapped(value) for name, value in shared.items()})
    order = {id(future): group for future, group in zip(futures, groups, strict=True)}
    results = []
    for future in as_completed(futures):
        group, result = order[id(future)], future.result()
        done += len(group)
        print(f"{label}: {done}/{total} ready")
        results.append((group, result, future.state.name))
    return results

"""Helpers shared by the bench scripts: timing, machine info, plain-text tables, JSON results.

Each script writes ``bench/results/NAME.json`` with `write_results`; timings are medians of
`timed` runs taken after warm-up runs, so that one-off costs (imports, allocator, ``vmap``
tracing) stay out of them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

if str(ROOT) not in sys.path:  # let `python bench/x.py` import daunce_core without installing
    sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def machine_info() -> dict:
    """Platform, CPU count, Python, numpy and torch versions, torch threads, and a UTC timestamp."""
    import numpy as np

    info = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch
    except ImportError:  # a numpy-only bench
        return info
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def machine_line(info: dict) -> str:
    """One readable line out of `machine_info`."""
    parts = [info["platform"], f"{info['cpu_count']} cores", f"python {info['python']}"]
    if "torch" in info:
        parts += [f"torch {info['torch']}", f"torch threads {info['torch_threads']}"]
    return ", ".join(parts) + f" ({info['timestamp']})"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns right-aligned (left for the first), widths from the content."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def write_results(name: str, results: dict) -> Path:
    """Write ``results`` to ``bench/results/NAME.json`` (indented); return the path."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path

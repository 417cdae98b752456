"""Files the workspace shares: tensors written with the mode every other file gets.

safetensors creates its files readable by their owner only (0600), where every other file of a
workspace (Zarr chunks, records, Parquet, DuckDB) gets ``0666`` less the process's umask: a
teammate who can read the workspace could read every artefact but the models and copies.
`save_tensors` and `share` give them the workspace's mode.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def share(path: str | Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode ``0666`` less the umask."""
    path = Path(path)
    mode = 0o666 & ~_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)


def save_tensors(tensors: dict, path: str | Path) -> None:
    """`safetensors.torch.save_file`, with the mode any other file of the workspace gets."""
    save_file(tensors, str(path))
    share(path)

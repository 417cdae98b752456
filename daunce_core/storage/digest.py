"""Content digests (SHA-256, hex) of configurations, arrays, example sets, models and files.

Digests name runs and key caches: equal content gives equal digests on any machine, so a rerun
recognises what it has already computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def digest_json(value: Any) -> str:
    """Digest of a JSON-serialisable value (keys sorted, so dict order does not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _update_array(hasher, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    hasher.update(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(array.tobytes())


def digest_arrays(arrays: dict[str, Any]) -> str:
    """Digest of named arrays or tensors (name, dtype, shape and bytes of each)."""
    hasher = hashlib.sha256()
    for name in sorted(arrays):
        hasher.update(name.encode())
        value = arrays[name]
        _update_array(hasher, value.detach().cpu().numpy() if torch.is_tensor(value) else value)
    return hasher.hexdigest()


def digest_rows(arrays: dict[str, np.ndarray]) -> list[str]:
    """One digest per example (row) over all columns: stable example content digests."""
    count = len(next(iter(arrays.values())))
    digests = []
    for i in range(count):
        hasher = hashlib.sha256()
        for name in sorted(arrays):
            hasher.update(name.encode())
            _update_array(hasher, np.asarray(arrays[name][i]))
        digests.append(hasher.hexdigest())
    return digests


def digest_model(model: nn.Module) -> str:
    """Digest of a model's parameters and buffers."""
    return digest_arrays(dict(model.state_dict()))


def digest_file(path: str | Path, block: int = 1 << 20) -> str:
    """Digest of a file's bytes, read in blocks (memoised per path, size and modification)."""
    stat = Path(path).stat()
    return _digest_file(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, block)


@functools.lru_cache(maxsize=256)
def _digest_file(path: str, size: int, mtime_ns: int, block: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            hasher.update(chunk)
    return hasher.hexdigest()


def digest_path(path: str | Path) -> str:
    """Digest of a file's bytes, or of every file (relative name and bytes) below a folder."""
    path = Path(path)
    if path.is_file():
        return digest_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return digest_json({str(p.relative_to(path)): digest_file(p) for p in files})

"""Manifests: the one "done" signal of each artefact a pipeline step writes.

A step's artefact (canonical data, base model, base signals, scores, exports, a baseline's
scores) gets a manifest beside it when the step finishes: the digest of the step's inputs
(``key``), the step's record (what it returned: paths, digests, shapes), and the content digest
of every file or folder the record names. The artefact is done for those inputs exactly when
the manifest's key matches and every named file still has its recorded content: a deleted,
truncated or overwritten artefact is computed again, never served stale, and an artefact made
from other inputs is never mistaken for this one.

Paths inside the workspace are stored relative to it (`portable`: ``${workspace}/data/...``) and
made absolute again when read (`local`), so a copied or moved workspace finds its artefacts —
its own, never the original's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daunce_core.storage.digest import digest_path

WORKSPACE = "${workspace}"
"""What stands for the workspace folder in a stored path (`portable`)."""


def portable(value: Any, root: str | Path | None) -> Any:
    """``value`` with every string that is a path inside ``root`` written as ``${workspace}/...``.

    Walks dicts, lists and tuples (tuples become lists, as in JSON); other values and paths
    outside ``root`` (the user's data, a checkpoint) are kept as they are. ``root`` may be given
    relative or absolute: paths written either way are recognised. ``None``: unchanged.
    """
    if root is None:
        return value
    prefixes = {str(Path(root)), str(Path(root).resolve())}
    return _walk(value, lambda text: _to_portable(text, prefixes))


def local(value: Any, root: str | Path | None) -> Any:
    """`portable`'s inverse: ``${workspace}/...`` made a path inside ``root`` again."""
    if root is None:
        return value
    return _walk(value, lambda text: _to_local(text, str(Path(root))))


def _walk(value: Any, change) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {change(k) if isinstance(k, str) else k: _walk(v, change) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, change) for v in value]
    return value


def _to_portable(text: str, prefixes: set[str]) -> str:
    for prefix in sorted(prefixes, key=len, reverse=True):
        if text == prefix or text.startswith(prefix.rstrip("/") + "/"):
            return WORKSPACE + text[len(prefix.rstrip("/")) :]
    return text


def _to_local(text: str, root: str) -> str:
    if text == WORKSPACE or text.startswith(WORKSPACE + "/"):
        return root.rstrip("/") + text[len(WORKSPACE) :]
    return text


def _uris(record: Any) -> list[str]:
    """The files a record names: each ``uri``, and its ``companions`` (written by the same step)."""
    records = [r for r in (record if isinstance(record, list) else [record]) if isinstance(r, dict)]
    return [u for r in records for u in [r.get("uri"), *r.get("companions", [])] if u]


def _content(uris: list[str]) -> dict[str, str | None]:
    return {uri: digest_path(uri) if Path(uri).exists() else None for uri in uris}


def write_manifest(path: str | Path, key: str, record: Any, root: str | Path | None = None) -> None:
    """Record that ``record``'s artefacts were made from inputs digesting to ``key``.

    Paths inside the workspace ``root`` are stored relative to it (`portable`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = _content(_uris(record))
    body = {"key": key, "record": portable(record, root), "content": portable(content, root)}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(body, default=str))
    partial.replace(path)


def _body(path: str | Path, root: str | Path | None) -> dict | None:
    """The manifest at ``path``, paths local to ``root``, if its files have their content."""
    try:
        body = local(json.loads(Path(path).read_text()), root)
    except (OSError, ValueError):
        return None
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, dict) or None in content.values():
        return None
    return body if _content(list(content)) == content else None


def read_manifest(path: str | Path, key: str, root: str | Path | None = None) -> Any | None:
    """The record of a done artefact for inputs ``key``; None if it must be computed again.

    Its paths inside the workspace are made local to ``root`` (`local`).
    """
    body = _body(path, root)
    return body.get("record") if body is not None and body.get("key") == key else None


def manifest_intact(path: str | Path, root: str | Path | None = None) -> bool:
    """Whether the artefact of the manifest at ``path`` is intact, whatever its inputs were."""
    return _body(path, root) is not None

"""Manifests: the one "done" signal of each artefact a pipeline step writes.

A step's artefact (canonical data, base model, base signals, scores, exports, a baseline's
scores) gets a manifest beside it when the step finishes: the digest of the step's inputs
(``key``), the step's record (what it returned: paths, digests, shapes), and the content digest
of every file or folder the record names. The artefact is done for those inputs exactly when
the manifest's key matches and every named file still has its recorded content: a deleted,
truncated or overwritten artefact is computed again, never served stale, and an artefact made
from other inputs is never mistaken for this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daunce_core.storage.digest import digest_path


def _uris(record: Any) -> list[str]:
    records = record if isinstance(record, list) else [record]
    return [r["uri"] for r in records if isinstance(r, dict) and r.get("uri")]


def _content(uris: list[str]) -> dict[str, str | None]:
    return {uri: digest_path(uri) if Path(uri).exists() else None for uri in uris}


def write_manifest(path: str | Path, key: str, record: Any) -> None:
    """Record that ``record``'s artefacts were made from inputs digesting to ``key``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"key": key, "record": record, "content": _content(_uris(record))}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(body, default=str))
    partial.replace(path)


def _body(path: str | Path) -> dict | None:
    """The manifest at ``path`` if every file it names still has its recorded content."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, dict) or None in content.values():
        return None
    return body if _content(list(content)) == content else None


def read_manifest(path: str | Path, key: str) -> Any | None:
    """The record of a done artefact for inputs ``key``; None if it must be computed again."""
    body = _body(path)
    return body.get("record") if body is not None and body.get("key") == key else None


def manifest_intact(path: str | Path) -> bool:
    """Whether the artefact of the manifest at ``path`` is intact, whatever its inputs were."""
    return _body(path) is not None

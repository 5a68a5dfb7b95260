"""The scan's cache: results per checkpoint, keyed by its files' modification time and size and
by a fingerprint of the settings, in one JSON file rewritten after every measured checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from memwatch.apps.scan.checkpoints import _qualified
from memwatch.apps.scan.results import CheckpointScan
from memwatch.attribution import CopiedItem

CACHE_NAME = "scan_cache.json"
_CACHE_VERSION = 1


class _Cache:
    """``{resolved path: {mtime_ns, size, settings, step, values, copied}}`` in one JSON file,
    rewritten (atomically) after every measured checkpoint, so an interrupted scan resumes."""

    def __init__(self, path: Path | None, settings: str, *, enabled: bool) -> None:
        self.path, self.settings = path, settings
        self.entries: dict[str, Any] = {}
        if path is not None and path.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                stored = json.loads(path.read_text())
                if stored.get("version") == _CACHE_VERSION:
                    self.entries = stored.get("checkpoints", {})
        self.enabled = enabled

    def _stamp(self, path: Path) -> dict[str, Any]:
        stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path.stat()]
        mtime, size = max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats)
        return {"mtime_ns": mtime, "size": size, "settings": self.settings}

    def get(self, path: Path) -> dict[str, Any] | None:
        entry = self.entries.get(str(path))
        if not self.enabled or entry is None:
            return None
        return entry if all(entry.get(k) == v for k, v in self._stamp(path).items()) else None

    def put(self, path: Path, entry: dict[str, Any]) -> None:
        self.entries[str(path)] = {**self._stamp(path), **entry}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "checkpoints": self.entries}, default=str))
            tmp.replace(self.path)


def _fingerprint(obj: Any) -> str:
    """A stable hash of the scan's settings (tensors by content, callables by name)."""
    return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True).encode()).hexdigest()


def _plain(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        data = obj.detach().cpu().contiguous()
        return {"tensor": hashlib.sha256(data.numpy().tobytes()).hexdigest(), "shape": list(data.shape)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return _qualified(obj)
    return repr(obj)


def _item_dict(item: CopiedItem) -> dict[str, Any]:
    return {
        "index": item.index,
        "id": item.id,
        "copies": item.copies,
        "flagged_copies": item.flagged_copies,
        "probes": list(item.probes),
    }


def _from_entry(path: Path, entry: dict[str, Any], *, cached: bool) -> CheckpointScan:
    copied = [
        CopiedItem(c["index"], c["id"], c["copies"], c["flagged_copies"], tuple(c["probes"])) for c in entry["copied"]
    ]
    return CheckpointScan(path, int(entry["step"]), dict(entry["values"]), copied, cached)

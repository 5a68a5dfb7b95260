"""Read back an offline W&B run from disk, so tests check what was really written (no mocks).

An offline run (wandb 0.31) is a folder ``<root>/wandb/offline-run-<date>-<id>/`` holding
``run-<id>.wandb`` and the logged media under ``files/media/``. The ``.wandb`` file is a
LevelDB-style log:

* a 7-byte header: ``b":W&B"``, the magic ``0xBEE1`` (uint16, little-endian), version ``0``;
* then 32 KiB blocks of records, each framed as ``crc32 (uint32 LE) | length (uint16 LE) |
  type (uint8) | payload``, where the CRC is ``zlib.crc32(bytes([type]) + payload)`` and the
  type is FULL (1) or a FIRST (2) / MIDDLE (3) / LAST (4) fragment of a record that spans
  blocks; fewer than 7 bytes left in a block are zero padding;
* each reassembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Every ``run.log`` call becomes one ``history`` record whose items carry a key path
(``nested_key``: ``[key]`` for a scalar, ``[key, field]`` for each field of a media value) and
the value as JSON; media values are stubs such as ``{"_type": "histogram", "values", "bins"}``,
``{"_type": "image-file", "path": "media/images/..."}``, ``{"_type": "images/separated",
"filenames": [...]}`` or ``{"_type": "table-file", "path": "media/table/..."}``.

The reader is strict: a bad header, a CRC mismatch, a broken fragment chain or a truncated
record raise ``ValueError``, so a test can't pass on a file it misread; and it waits for the
run's final ``exit`` record, so it never reads a run that wandb-core is still writing.

Example:
    >>> run_dir = find_offline_run(tmp_path)                          # doctest: +SKIP
    >>> rows = read_history(run_dir)                                  # doctest: +SKIP
    >>> [r["memwatch/lid_mean"] for r in rows if "memwatch/lid_mean" in r]  # doctest: +SKIP
    [3.0]
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "find_offline_run",
    "history_values",
    "media_files",
    "read_history",
    "read_media_json",
    "read_records",
    "record_types",
]

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # 7 bytes
_BLOCK = 32 * 1024
_FRAME = struct.Struct("<IHB")  # crc32, length, type: 7 bytes
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_offline_run(root: str | Path) -> Path:
    """The one ``offline-run-*`` folder below ``root`` (searched recursively).

    Raises:
        FileNotFoundError: no offline run below ``root``.
        ValueError: more than one (the caller must say which).
    """
    runs = sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir() and not p.is_symlink())
    if not runs:
        raise FileNotFoundError(f"no wandb offline-run-* folder below {root}")
    if len(runs) > 1:
        raise ValueError(f"{len(runs)} offline runs below {root}: {[p.name for p in runs]}")
    return runs[0]


def _wandb_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {path}, found {[f.name for f in files]}")
    return files[0]


def _payloads(data: bytes) -> Iterator[bytes]:
    """Reassembled record payloads of a ``.wandb`` file's bytes (see the module docstring)."""
    if data[: len(_HEADER)] != _HEADER:
        raise ValueError(f"not a wandb log: header {data[:7]!r}, expected {_HEADER!r}")
    pos, parts = len(_HEADER), None
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _FRAME.size:  # zero padding at the end of a block
            if data[pos : pos + left].strip(b"\0"):
                raise ValueError(f"non-zero block padding at byte {pos}")
            pos += left
            continue
        if pos + _FRAME.size > len(data):
            raise ValueError(f"truncated record frame at byte {pos}")
        crc, length, kind = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        if start + length > len(data) or length > left - _FRAME.size:
            raise ValueError(f"record at byte {pos} claims {length} bytes past its block or the file")
        payload = data[start : start + length]
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"CRC mismatch in record at byte {pos}")
        pos = start + length
        if kind == _FULL and parts is None:
            yield payload
        elif kind == _FIRST and parts is None:
            parts = [payload]
        elif kind == _MIDDLE and parts is not None:
            parts.append(payload)
        elif kind == _LAST and parts is not None:
            yield b"".join([*parts, payload])
            parts = None
        else:
            raise ValueError(f"unexpected record type {kind} at byte {pos - length - _FRAME.size}")
    if parts is not None:
        raise ValueError("file ends inside a fragmented record")


def read_records(path: str | Path, *, timeout: float = 60.0) -> list[Any]:
    """All ``wandb_internal_pb2.Record`` messages of a finished run, in file order.

    ``wandb.finish()`` in offline mode can return before wandb-core has written the file (seen
    with wandb 0.31: only the 7-byte header on disk right after ``finish``), so this polls until
    the file parses and ends with the ``exit`` record that wandb-core writes last.

    Args:
        path: the ``run-*.wandb`` file or the ``offline-run-*`` folder holding it.
        timeout: seconds to wait for the ``exit`` record.

    Raises:
        ValueError: the file is still malformed at the deadline.
        TimeoutError: it parses but has no ``exit`` record at the deadline (run not finished).
    """
    from wandb.proto import wandb_internal_pb2

    file = _wandb_file(path)
    deadline = time.monotonic() + timeout
    while True:
        records, error = [], None
        try:
            for payload in _payloads(file.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append(record)
        except ValueError as err:  # possibly a record still being written
            error = err
        if error is None and records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            if error is not None:
                raise error
            raise TimeoutError(f"{file} has no exit record after {timeout}s; seen {record_types(records)}")
        time.sleep(0.05)


def record_types(records: list[Any]) -> dict[str, int]:
    """How many records of each ``record_type`` (``"history"``, ``"metric"``, ``"alert"``, …)."""
    counts: dict[str, int] = {}
    for record in records:
        kind = record.WhichOneof("record_type") or "<none>"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def read_history(run_dir: str | Path, *, timeout: float = 60.0) -> list[dict[str, Any]]:
    """One dict per logged history row (one ``run.log`` call), values JSON-decoded.

    Keys are as logged; a media value, which wandb stores as one item per field under a
    ``nested_key`` ``[key, field]``, comes back as one dict, e.g.
    ``row["memwatch/h"] == {"_type": "histogram", "values": [...], "bins": [...]}``. Rows also
    hold wandb's own ``_step``, ``_runtime`` and ``_timestamp``.
    """
    rows = []
    for record in read_records(run_dir, timeout=timeout):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def history_values(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """The values of ``key`` in row order (rows without it are skipped)."""
    return [row[key] for row in rows if key in row]


def media_files(run_dir: str | Path, suffix: str = "") -> list[Path]:
    """Files under ``<run_dir>/files/media`` whose name ends with ``suffix``, sorted."""
    root = Path(run_dir) / "files" / "media"
    return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())


def read_media_json(run_dir: str | Path, entry: dict[str, Any]) -> Any:
    """Load the JSON file a history entry points at (``entry["path"]``, e.g. a table)."""
    return json.loads((Path(run_dir) / "files" / entry["path"]).read_text())

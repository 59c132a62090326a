"""The digest runs of a manifest's JSON, for tests that read or damage them: packed
(format 2) or JSON lists (format 1)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from backupd.manifest import DigestRun

_RUN = struct.Struct("<QQQ32s")


def runs(record: dict[str, Any]) -> list[list[Any]]:
    """A disk record's runs as ``[host offset, length, guest offset, hex digest]``."""
    stored = record["digests"]
    if isinstance(stored, list):
        return stored
    blob = base64.b64decode(stored)
    return [[h, n, g, d.hex()] for h, n, g, d in _RUN.iter_unpack(blob)]


def set_runs(data: dict[str, Any], disk: str, rows: list[list[Any]], packed: bool) -> None:
    """Store ``rows`` in ``data``'s disk record: packed (a format 2 manifest; every
    field must fit its record), or as JSON lists (the manifest becomes format 1)."""
    if packed:
        blob = b"".join(_RUN.pack(h, n, g, bytes.fromhex(d)) for h, n, g, d in rows)
        data["disks"][disk]["digests"] = base64.b64encode(blob).decode("ascii")
        return
    data["format"] = 1
    for name, other in data["disks"].items():
        other["digests"] = rows if name == disk else runs(other)


def first_run(record: dict[str, Any]) -> DigestRun:
    return DigestRun(*runs(record)[0])

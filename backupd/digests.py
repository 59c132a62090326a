"""Content digests of stored data: which algorithm new backups use, and hashing by name.

New backups record BLAKE3 (the ``blake3`` package: a cryptographic hash ~4x faster
than SHA-256 with SHA extensions, and it releases the GIL), so hashing no longer bounds
the copy.  Manifests written with ``sha256`` stay verifiable: every disk record names
its algorithm, and one without a name is ``sha256``.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import blake3

#: the algorithm of new backups
ALGORITHM = "blake3"
#: the algorithm of manifests that name none
LEGACY = "sha256"
ALGORITHMS = ("blake3", "sha256")

Buffer = bytes | bytearray | memoryview


def hexdigest(data: Buffer, algorithm: str = ALGORITHM) -> str:
    """The hex digest of ``data`` (thread-safe; the GIL is released while hashing)."""
    if algorithm == "blake3":
        return blake3.blake3(data).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


class Hasher(Protocol):
    """An incremental digest (``blake3.blake3`` or ``hashlib.sha256``)."""

    def update(self, data: Buffer, /) -> object: ...

    def hexdigest(self) -> str: ...


def hasher(algorithm: str = ALGORITHM) -> Hasher:
    """A new incremental digest of ``algorithm`` (for data read piece by piece)."""
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")

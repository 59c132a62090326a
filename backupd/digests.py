"""Content digests of stored data: which algorithm new backups use, and hashing by name.

New backups record BLAKE3 (the ``blake3`` package: a cryptographic hash ~4x faster
than SHA-256 with SHA extensions, and it releases the GIL), so hashing no longer bounds
the copy.  Manifests written with ``sha256`` stay verifiable: every disk record names
its algorithm, and one without a name is ``sha256``.

Digests of encrypted files are ``blake3-keyed``: BLAKE3 in keyed mode over the
plaintext, keyed with a key derived from the file's master key (BLAKE3 ``derive_key``),
so a manifest says nothing about the content to whoever lacks the key, and ``verify``
(which has it) proves both the stored ciphertext and that it decrypts to what was read.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import blake3

#: the algorithm of new backups
ALGORITHM = "blake3"
#: the algorithm of new backups of encrypted files: BLAKE3 keyed with the file's digest key
KEYED = "blake3-keyed"
#: the algorithm of manifests that name none
LEGACY = "sha256"
ALGORITHMS = ("blake3", "blake3-keyed", "sha256")
#: BLAKE3 key derivation context of the digest key (derive_key mode): never change it
DIGEST_KEY_CONTEXT = "backupd 2026-11 qcow2 LUKS master key -> manifest digest key"

Buffer = bytes | bytearray | memoryview


def derive_digest_key(master_key: bytes) -> bytes:
    """The 32-byte key of the digests of an encrypted file, from its master key."""
    return blake3.blake3(master_key, derive_key_context=DIGEST_KEY_CONTEXT).digest()


def _needs_key(algorithm: str, key: bytes | None) -> None:
    if (algorithm == KEYED) != (key is not None):
        raise ValueError(f"digest algorithm {algorithm!r} with{'out' if key is None else ''} a key")


def hexdigest(data: Buffer, algorithm: str = ALGORITHM, key: bytes | None = None) -> str:
    """The hex digest of ``data`` (thread-safe; the GIL is released while hashing);
    ``key`` for :data:`KEYED`."""
    _needs_key(algorithm, key)
    if key is not None:
        return blake3.blake3(data, key=key).hexdigest()
    if algorithm == "blake3":
        return blake3.blake3(data).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


class Hasher(Protocol):
    """An incremental digest (``blake3.blake3`` or ``hashlib.sha256``)."""

    def update(self, data: Buffer, /) -> object: ...

    def hexdigest(self) -> str: ...


def hasher(algorithm: str = ALGORITHM, key: bytes | None = None) -> Hasher:
    """A new incremental digest of ``algorithm`` (for data read piece by piece)."""
    _needs_key(algorithm, key)
    if key is not None:
        return blake3.blake3(key=key)
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")

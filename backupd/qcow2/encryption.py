"""The key of one encrypted qcow2 file: made for a new file, or unlocked from an
existing one with the passphrase.

Every file gets a master key of its own (random, never stored in the clear), kept in
the file's LUKS header under the passphrase (:mod:`backupd.qcow2.luks`); its data
clusters are AES-XTS encrypted with it, IVs from their host offsets
(:mod:`backupd.qcow2.xts`).  A fresh master key per file means that no two files ever
encrypt under the same key and tweak, whatever their layouts.  The digests of an
encrypted file are BLAKE3 keyed with a key derived from its master key, so they stay
valid when ``backupd rekey`` changes the passphrase (which re-wraps, never replaces, the
master key) and give nothing away without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backupd.digests import derive_digest_key
from backupd.qcow2 import layout, luks
from backupd.qcow2.xts import SectorCipher

if TYPE_CHECKING:
    from backupd.qcow2.inspector import ImageReader


class WrongKey(ValueError):
    """The passphrase opens no key slot of the file."""


@dataclass(frozen=True, slots=True)
class KeySpec:
    """How new files are encrypted: the passphrase, the cipher's key size (64 bytes:
    aes-256-xts, 32: aes-128-xts), the KDF hash and PBKDF2 iterations."""

    passphrase: bytes
    key_bytes: int = 64
    hash_name: str = "sha256"
    iterations: int = 100_000


@dataclass(frozen=True, slots=True)
class ImageKey:
    """The master key of one file, with its data cipher and its digest key."""

    master_key: bytes
    cipher: SectorCipher
    digest_key: bytes

    @classmethod
    def of(cls, master_key: bytes) -> ImageKey:
        return cls(master_key, SectorCipher(master_key), derive_digest_key(master_key))

    @classmethod
    def new(cls, spec: KeySpec) -> tuple[ImageKey, bytes]:
        """A fresh key, and the LUKS header region that holds it under the passphrase
        (PBKDF2 runs here: call it in a thread)."""
        master = os.urandom(spec.key_bytes)
        region = luks.create(
            spec.passphrase, master, hash_name=spec.hash_name, iterations=spec.iterations
        )
        return cls.of(master), region

    def plaintext(self, stored: bytes | memoryview, offset: int, length: int) -> bytes:
        """The first ``length`` plaintext bytes of ``stored``, read at host ``offset`` (a
        sector boundary); a short last sector is padded first (its cluster is the
        file's)."""
        sectors = bytearray(stored) + bytes(-len(stored) % 512)
        self.cipher.decrypt(sectors, offset)
        return bytes(sectors[:length])


def _pread(fd: int | ImageReader, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset) if isinstance(fd, int) else fd.pread(length, offset)


def luks_region(fd: int | ImageReader) -> tuple[int, int] | None:
    """(offset, length) of the LUKS header region of the qcow2 file on ``fd`` (None for a
    file that is not encrypted).  For files the gate accepted: the header extensions lie
    in cluster 0 and the region inside the file."""
    head = _pread(fd, layout.HEADER_LENGTH, 0)
    fields = layout.HEADER.unpack(head)
    if fields[6] != layout.CRYPT_LUKS:
        return None
    region = layout.fde_extension(_pread(fd, 1 << int(fields[4]), 0))
    if region is not None:
        return region
    raise luks.LuksError("encrypted image without its encryption header extension")


def read_header(fd: int | ImageReader) -> tuple[luks.LuksHeader, int] | None:
    """The LUKS header of the file on ``fd`` and its region's offset (None: not encrypted)."""
    where = luks_region(fd)
    if where is None:
        return None
    offset, length = where
    return luks.parse(_pread(fd, luks.HEADER_BYTES, offset), length), offset


def unlock_file(fd: int | ImageReader, passphrase: bytes, what: str) -> ImageKey:
    """The key of the encrypted file on ``fd``: a descriptor, or an image in a bucket
    (:attr:`backupd.storage.images.ImageFile.inspectable`); WrongKey naming ``what``
    when the passphrase opens none of its key slots."""
    found = read_header(fd)
    if found is None:
        raise luks.LuksError(f"{what} is not encrypted")
    header, offset = found

    def read(position: int, length: int) -> bytes:
        data = _pread(fd, length, offset + position)
        if len(data) != length:
            raise luks.LuksError(f"{what}: LUKS key material is cut short")
        return data

    master = luks.unlock(header, read, passphrase)
    if master is None:
        raise WrongKey(f"the key does not open {what} (wrong key file?)")
    return ImageKey.of(master)

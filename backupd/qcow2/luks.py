"""The LUKS (version 1) header of an encrypted qcow2 image: made, checked and unlocked
without I/O, as qemu's ``crypto/block-luks.c`` and ``crypto/afsplit.c`` lay it out
(cryptsetup's LUKS1 on-disk format, which they follow).

The *region* is what the qcow2 "full disk encryption header pointer" extension points
at: the 592-byte partition header, then 8 key-slot areas, each the master key spread
over 4000 stripes (anti-forensic split) and encrypted with a key derived from the
passphrase (PBKDF2), from sector 8 on, each area rounded up to 8 sectors.  Its length is
the header's ``payload_offset`` in sectors (the payload itself is the qcow2 clusters).

Byte layout (big endian): magic ``LUKS\\xba\\xbe``, version (u16), cipher name, cipher
mode, hash spec (32 bytes each, NUL terminated), payload offset (u32, sectors), key
bytes (u32), master-key digest (20), its salt (32), its PBKDF2 iterations (u32), UUID
(40), then 8 slots of: state (u32: 0x00AC71F3 active, 0x0000DEAD inactive), PBKDF2
iterations (u32), salt (32), key material offset (u32, sectors), stripes (u32).

Only what backupd writes is accepted: ``aes`` in ``xts-plain64`` with a 32- or 64-byte
key, hash sha256 or sha512, 4000 stripes, slots where qemu puts them, and iteration
counts that open in bounded time (a crafted header must not make ``verify`` or qemu
spin for hours).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # numpy and cryptography are imported only when a key is used
    from backupd.qcow2.xts import SectorCipher

MAGIC: Final = b"LUKS\xba\xbe"
VERSION: Final = 1
SECTOR: Final = 512
SLOTS: Final = 8
STRIPES: Final = 4000
ACTIVE: Final = 0x00AC71F3
INACTIVE: Final = 0x0000DEAD
#: where the first key material starts, and the alignment of every slot's area
SLOT_ALIGN: Final = 4096
DIGEST_BYTES: Final = 20
SALT_BYTES: Final = 32
MIN_ITERATIONS: Final = 1000
#: the most PBKDF2 iterations a slot or the master-key digest may ask for (~10 s here):
#: more is a crafted header, refused before anyone derives a key from it
MAX_ITERATIONS: Final = 1 << 24
HASHES: Final = ("sha256", "sha512")
#: cipher names of the configuration -> key bytes (XTS: two AES keys)
CIPHERS: Final = {"aes-256-xts-plain64": 64, "aes-128-xts-plain64": 32}

_SLOT = struct.Struct(">II32sII")
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
HEADER_BYTES: Final = _HEADER.size + SLOTS * _SLOT.size  # 592


class LuksError(ValueError):
    """A LUKS header backupd would not have written (the message says why)."""


@dataclass(frozen=True, slots=True)
class KeySlot:
    active: bool
    iterations: int
    salt: bytes
    #: key material offset, in sectors from the region's start
    offset: int
    stripes: int = STRIPES


@dataclass(frozen=True, slots=True)
class LuksHeader:
    hash_name: str
    key_bytes: int
    payload_offset: int  # sectors: the region's length
    digest: bytes
    digest_salt: bytes
    digest_iterations: int
    uuid: bytes
    slots: tuple[KeySlot, ...]

    @property
    def region_bytes(self) -> int:
        return self.payload_offset * SECTOR

    @property
    def material_bytes(self) -> int:
        return self.key_bytes * STRIPES

    def pack(self) -> bytes:
        head = _HEADER.pack(
            MAGIC,
            VERSION,
            b"aes",
            b"xts-plain64",
            self.hash_name.encode(),
            self.payload_offset,
            self.key_bytes,
            self.digest,
            self.digest_salt,
            self.digest_iterations,
            self.uuid,
        )
        slots = b"".join(
            _SLOT.pack(ACTIVE if s.active else INACTIVE, s.iterations, s.salt, s.offset, s.stripes)
            for s in self.slots
        )
        return head + slots


def _ceil(value: int, unit: int) -> int:
    return -(-value // unit)


def material_sectors(key_bytes: int) -> int:
    """Sectors the split key material of one slot fills."""
    return _ceil(key_bytes * STRIPES, SECTOR)


def slot_sectors(key_bytes: int) -> int:
    """Sectors of one slot's key material area (rounded up to :data:`SLOT_ALIGN`)."""
    per = SLOT_ALIGN // SECTOR
    return _ceil(material_sectors(key_bytes), per) * per


def slot_offset(key_bytes: int, index: int) -> int:
    """Where qemu (and cryptsetup) put slot ``index``'s key material, in sectors."""
    return SLOT_ALIGN // SECTOR + slot_sectors(key_bytes) * index


def region_sectors(key_bytes: int) -> int:
    return slot_offset(key_bytes, SLOTS)


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations, length)


@functools.cache
def _rate(hash_name: str, key_bytes: int) -> float:
    """PBKDF2 iterations per second on this machine for a ``key_bytes`` key."""
    count = 20_000
    started = time.perf_counter()
    pbkdf2(hash_name, b"calibration", bytes(SALT_BYTES), count, key_bytes)
    return count / max(time.perf_counter() - started, 1e-6)


def iterations_for(hash_name: str, key_bytes: int, seconds: float) -> int:
    """Slot iterations that take ``seconds`` to derive here (measured once per process,
    like qemu's ``iter-time``); qemu's own PBKDF2 is as fast or faster."""
    wanted = int(_rate(hash_name, key_bytes) * seconds)
    return min(max(wanted, MIN_ITERATIONS), MAX_ITERATIONS)


def _diffuse(hash_name: str, block: bytearray) -> None:
    """The AF splitter's diffusion: each digest-sized piece ``i`` of ``block`` becomes
    ``H(be32(i) || piece)`` (the last piece truncated)."""
    size = hashlib.new(hash_name).digest_size
    for index, start in enumerate(range(0, len(block), size)):
        piece = block[start : start + size]
        digest = hashlib.new(hash_name, struct.pack(">I", index) + piece).digest()
        block[start : start + len(piece)] = digest[: len(piece)]


def _xor(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    size = len(a)
    return bytearray((int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(size))


def _chain(hash_name: str, stripes: bytes, size: int, count: int) -> bytearray:
    """XOR-and-diffuse over the first ``count`` stripes of ``size`` bytes."""
    block = bytearray(size)
    for i in range(count):
        block = _xor(block, stripes[i * size : (i + 1) * size])
        _diffuse(hash_name, block)
    return block


def af_split(hash_name: str, key: bytes, stripes: int = STRIPES) -> bytes:
    """``key`` spread over ``stripes`` blocks: stripes-1 random, the last one ``key``
    xor the diffusion chain of the random ones."""
    size = len(key)
    spread = os.urandom(size * (stripes - 1))
    return spread + bytes(_xor(_chain(hash_name, spread, size, stripes - 1), key))


def af_merge(hash_name: str, material: bytes, size: int, stripes: int = STRIPES) -> bytes:
    """The key :func:`af_split` spread over ``material``."""
    block = _chain(hash_name, material, size, stripes - 1)
    return bytes(_xor(block, material[(stripes - 1) * size : stripes * size]))


def _slot_cipher(hash_name: str, passphrase: bytes, slot: KeySlot, key_bytes: int) -> SectorCipher:
    from backupd.qcow2.xts import SectorCipher

    return SectorCipher(pbkdf2(hash_name, passphrase, slot.salt, slot.iterations, key_bytes))


def create(
    passphrase: bytes,
    master_key: bytes,
    *,
    hash_name: str = "sha256",
    iterations: int,
) -> bytes:
    """A new region holding ``master_key`` in slot 0 under ``passphrase`` (slot
    ``iterations`` of PBKDF2; the master-key digest gets an eighth, as in qemu)."""
    key_bytes = len(master_key)
    if key_bytes not in CIPHERS.values() or hash_name not in HASHES:
        raise ValueError("unsupported LUKS key size or hash")
    iterations = min(max(iterations, MIN_ITERATIONS), MAX_ITERATIONS)
    digest_salt = os.urandom(SALT_BYTES)
    digest_iterations = max(iterations // 8, MIN_ITERATIONS)
    first = KeySlot(True, iterations, os.urandom(SALT_BYTES), slot_offset(key_bytes, 0))
    empty = [KeySlot(False, 0, bytes(SALT_BYTES), slot_offset(key_bytes, i)) for i in range(1, 8)]
    slots = (first, *empty)
    header = LuksHeader(
        hash_name=hash_name,
        key_bytes=key_bytes,
        payload_offset=region_sectors(key_bytes),
        digest=pbkdf2(hash_name, master_key, digest_salt, digest_iterations, DIGEST_BYTES),
        digest_salt=digest_salt,
        digest_iterations=digest_iterations,
        uuid=str(uuid.uuid4()).encode().ljust(40, b"\0"),
        slots=slots,
    )
    material = bytearray(af_split(hash_name, master_key))
    material += bytes(-len(material) % SECTOR)
    _slot_cipher(hash_name, passphrase, slots[0], key_bytes).encrypt(material, 0)
    region = bytearray(header.region_bytes)
    region[:HEADER_BYTES] = header.pack()
    start = slots[0].offset * SECTOR
    region[start : start + len(material)] = material
    return bytes(region)


def _text(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0 or any(raw[end:]):
        raise LuksError(f"LUKS {what} is not a NUL-terminated string")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise LuksError(f"LUKS {what} is not ASCII") from None


def parse(raw: bytes, region_bytes: int) -> LuksHeader:
    """The header at the start of a region of ``region_bytes`` (LuksError when it is not
    one backupd writes or qemu's ``amend`` leaves)."""
    if len(raw) < HEADER_BYTES:
        raise LuksError("LUKS header is cut short")
    fields = _HEADER.unpack_from(raw)
    magic, version, cipher, mode, hash_raw, payload, key_bytes = fields[:7]
    digest, digest_salt, digest_iterations, ident = fields[7:]
    if magic != MAGIC or version != VERSION:
        raise LuksError("not a LUKS version 1 header")
    if (_text(cipher, "cipher name"), _text(mode, "cipher mode")) != ("aes", "xts-plain64"):
        raise LuksError("LUKS cipher is not aes xts-plain64")
    hash_name = _text(hash_raw, "hash")
    if hash_name not in HASHES or key_bytes not in CIPHERS.values():
        raise LuksError(f"LUKS hash {hash_name!r} or key size {key_bytes} is not backupd's")
    if payload != region_sectors(key_bytes) or payload * SECTOR != region_bytes:
        raise LuksError(f"LUKS payload offset {payload} does not match its region")
    if not MIN_ITERATIONS <= digest_iterations <= MAX_ITERATIONS:
        raise LuksError(f"LUKS master key digest with {digest_iterations} iterations")
    slots = []
    for index in range(SLOTS):
        state, iterations, salt, offset, stripes = _SLOT.unpack_from(
            raw, _HEADER.size + index * _SLOT.size
        )
        if state not in (ACTIVE, INACTIVE) or stripes != STRIPES:
            raise LuksError(f"LUKS key slot {index} is damaged")
        if offset != slot_offset(key_bytes, index):
            raise LuksError(f"LUKS key slot {index} is not where qemu puts it")
        if state == ACTIVE and not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise LuksError(f"LUKS key slot {index} with {iterations} iterations")
        slots.append(KeySlot(state == ACTIVE, iterations, salt, offset, stripes))
    if not any(s.active for s in slots):
        raise LuksError("LUKS header without an active key slot")
    return LuksHeader(
        hash_name, key_bytes, payload, digest, digest_salt, digest_iterations, ident, tuple(slots)
    )


Reader = Callable[[int, int], bytes]


def unlock(header: LuksHeader, read: Reader, passphrase: bytes) -> bytes | None:
    """The master key, from the first active slot ``passphrase`` opens (None when none
    does); ``read(offset, length)`` reads the region."""
    for slot in header.slots:
        if not slot.active:
            continue
        length = material_sectors(header.key_bytes) * SECTOR
        material = bytearray(read(slot.offset * SECTOR, length))
        cipher = _slot_cipher(header.hash_name, passphrase, slot, header.key_bytes)
        cipher.decrypt(material, 0)
        key = af_merge(header.hash_name, bytes(material), header.key_bytes)
        check = pbkdf2(
            header.hash_name, key, header.digest_salt, header.digest_iterations, DIGEST_BYTES
        )
        if hmac.compare_digest(check, header.digest):
            return key
    return None

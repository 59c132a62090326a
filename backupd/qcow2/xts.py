"""AES-XTS on 512-byte sectors with plain64 IVs: how qemu's LUKS encrypts the data
clusters of a qcow2 image (``cipher_mode`` ``xts-plain64`` in the LUKS header).

Each 512-byte sector is one XTS data unit whose tweak is its sector number (plain64: the
number as a 64-bit little-endian integer, zero-padded to 16 bytes).  In a qcow2 image the
number is that of the *host* sector: ``host_offset // 512`` in the image file
(docs/interop/qcow2.txt, "Data encryption": "the physical disk sector as the input
tweak"), so a cluster's ciphertext depends on where it lies in the file.  The LUKS key
material is encrypted the same way, numbered from the start of the material.

XTS (IEEE P1619) encrypts block ``j`` of a data unit as ``E1(P xor T_j) xor T_j`` with
``T_0 = E2(tweak)`` and ``T_j = T_0 * alpha^j`` in GF(2^128).  A library call per sector
costs ~17 us (30 MB/s), so whole runs are done at once instead: AES-ECB through the
``cryptography`` package (OpenSSL, AES-NI) for ``E2`` of every sector number and for
``E1`` of the whole run, and numpy for the ``alpha^j`` masks and the XORs: about 1 ms
per MiB on this machine's cores, the GIL released for most of it.
"""

from __future__ import annotations

import threading
from typing import Final

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR: Final = 512
#: 16-byte blocks per sector
BLOCKS: Final = SECTOR // 16
_U64 = np.uint64
_ONE, _TOP, _POLY = _U64(1), _U64(63), _U64(0x87)


class _Scratch(threading.local):
    """Per-thread work arrays, grown on demand (writes of a copy run in several threads)."""

    def __init__(self) -> None:
        self.sectors = 0
        self.lo = self.hi = self.masks = self.numbers = np.empty(0, dtype="<u8")
        self.carry = self.spill = np.empty(0, dtype="<u8")
        self.out = bytearray()

    def ensure(self, sectors: int) -> None:
        if sectors <= self.sectors:
            return
        self.sectors = sectors
        self.lo = np.empty((BLOCKS, sectors), dtype="<u8")
        self.hi = np.empty((BLOCKS, sectors), dtype="<u8")
        self.masks = np.empty((sectors, BLOCKS, 2), dtype="<u8")
        self.numbers = np.zeros((sectors, 2), dtype="<u8")
        self.carry = np.empty(sectors, dtype="<u8")
        self.spill = np.empty(sectors, dtype="<u8")
        self.out = bytearray(sectors * SECTOR + 16)


class SectorCipher:
    """AES-XTS-plain64 with one key (32 bytes: AES-128, 64 bytes: AES-256), applied in
    place to whole sectors numbered from a byte offset (thread-safe)."""

    def __init__(self, key: bytes) -> None:
        if len(key) not in (32, 64):
            raise ValueError(f"an XTS key has 32 or 64 bytes, not {len(key)}")
        half = len(key) // 2
        self._data = Cipher(algorithms.AES(key[:half]), modes.ECB())
        self._tweak = Cipher(algorithms.AES(key[half:]), modes.ECB())
        self._scratch = _Scratch()

    def encrypt(self, buf: memoryview | bytearray, offset: int) -> None:
        """Encrypt ``buf`` (whole sectors) in place; its first byte lies at ``offset``."""
        self._apply(buf, offset, encrypt=True)

    def decrypt(self, buf: memoryview | bytearray, offset: int) -> None:
        """Decrypt ``buf`` (whole sectors) in place; its first byte lies at ``offset``."""
        self._apply(buf, offset, encrypt=False)

    def _apply(self, buf: memoryview | bytearray, offset: int, *, encrypt: bool) -> None:
        length = len(buf)
        if offset % SECTOR or length % SECTOR:
            raise ValueError(f"XTS works on whole sectors, not {length} bytes at {offset}")
        if not length:
            return
        sectors = length // SECTOR
        scratch = self._scratch
        scratch.ensure(sectors)
        masks = self._masks(scratch, offset // SECTOR, sectors)
        data = np.frombuffer(buf, dtype="<u8", count=length // 8).reshape(sectors, BLOCKS, 2)
        np.bitwise_xor(data, masks, out=data)
        ecb = self._data.encryptor() if encrypt else self._data.decryptor()
        out = memoryview(scratch.out)[: length + 16]
        ecb.update_into(memoryview(buf).cast("B"), out)
        done = np.frombuffer(scratch.out, dtype="<u8", count=length // 8)
        np.bitwise_xor(done.reshape(sectors, BLOCKS, 2), masks, out=data)

    def _masks(self, scratch: _Scratch, first: int, sectors: int) -> np.ndarray:
        """``T_j`` of every block of sectors ``first..first+sectors-1``, laid out like the
        data: [sector][block][low, high 64 bits]."""
        numbers = scratch.numbers[:sectors]
        numbers[:, 0] = np.arange(first, first + sectors, dtype=_U64)
        encrypted = bytearray(sectors * 16 + 16)
        self._tweak.encryptor().update_into(numbers.tobytes(), encrypted)
        start = np.frombuffer(encrypted, dtype="<u8", count=sectors * 2).reshape(sectors, 2)
        lo, hi = scratch.lo[:, :sectors], scratch.hi[:, :sectors]
        carry, spill = scratch.carry[:sectors], scratch.spill[:sectors]
        lo[0], hi[0] = start[:, 0], start[:, 1]
        for j in range(1, BLOCKS):  # T_j = T_{j-1} * alpha: a 128-bit shift, reduced
            np.right_shift(hi[j - 1], _TOP, out=carry)
            np.multiply(carry, _POLY, out=carry)
            np.right_shift(lo[j - 1], _TOP, out=spill)
            np.left_shift(hi[j - 1], _ONE, out=hi[j])
            np.bitwise_or(hi[j], spill, out=hi[j])
            np.left_shift(lo[j - 1], _ONE, out=lo[j])
            np.bitwise_xor(lo[j], carry, out=lo[j])
        masks = scratch.masks[:sectors]
        masks[:, :, 0] = lo.T
        masks[:, :, 1] = hi.T
        return masks

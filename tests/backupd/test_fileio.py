"""Direct I/O helpers: aligned buffers, the alignment rule, and the buffered fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupd.fileio import (
    DIRECT_ALIGN,
    aligned_buffer,
    close_quietly,
    direct_ok,
    open_direct,
    write_direct,
)


def test_aligned_buffer_is_page_aligned_and_zeroed() -> None:
    import ctypes

    view = aligned_buffer(3 * DIRECT_ALIGN)
    address = ctypes.addressof(ctypes.c_char.from_buffer(view.obj))
    assert address % DIRECT_ALIGN == 0
    assert len(view) == 3 * DIRECT_ALIGN and bytes(view) == bytes(3 * DIRECT_ALIGN)


def test_direct_ok() -> None:
    view = memoryview(bytearray(2 * DIRECT_ALIGN))
    assert direct_ok(view, 65536)
    assert not direct_ok(view[:100], 65536)
    assert not direct_ok(view, 512)


def test_refused_direct_write_falls_back_to_buffered(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    direct = open_direct(path)
    try:
        data = aligned_buffer(DIRECT_ALIGN)
        data[:] = b"\xab" * DIRECT_ALIGN
        if direct < 0:
            pytest.skip(f"the filesystem of {tmp_path} does not do direct I/O")
        assert write_direct(direct, fd, data, 2 * DIRECT_ALIGN)  # aligned: taken
        # an offset of 1 is refused by every filesystem that does direct I/O
        assert not write_direct(direct, fd, data[:100], 1)
        content = path.read_bytes()
        assert content[1:101] == b"\xab" * 100
        assert content[2 * DIRECT_ALIGN : 3 * DIRECT_ALIGN] == b"\xab" * DIRECT_ALIGN
    finally:
        close_quietly(direct)
        os.close(fd)

"""Direct I/O: aligned buffers, the alignment rule, and DataFile's buffered fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdclient.fileio import DIRECT_ALIGN, DataFile, aligned_buffer, direct_ok


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
    out = DataFile(fd)
    try:
        if not out.direct:
            pytest.skip(f"the filesystem of {tmp_path} does not do direct I/O")
        data = aligned_buffer(DIRECT_ALIGN)
        data[:] = b"\xab" * DIRECT_ALIGN
        out.write(data, 2 * DIRECT_ALIGN)  # aligned: taken
        assert out.direct
        # offset and length aligned, the buffer's address not: the kernel refuses it
        odd = memoryview(bytearray(DIRECT_ALIGN + 1))[1:]
        odd[:] = b"\xcd" * DIRECT_ALIGN
        out.write(odd, 4 * DIRECT_ALIGN)
        assert not out.direct  # buffered from now on
        out.write(data[:100], 1)  # an unaligned offset never tries direct I/O
        content = path.read_bytes()
        assert content[1:101] == b"\xab" * 100
        assert content[2 * DIRECT_ALIGN : 3 * DIRECT_ALIGN] == b"\xab" * DIRECT_ALIGN
        assert content[4 * DIRECT_ALIGN : 5 * DIRECT_ALIGN] == b"\xcd" * DIRECT_ALIGN
    finally:
        out.close()
        os.close(fd)

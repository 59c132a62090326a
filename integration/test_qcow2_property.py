"""Property: whatever the streaming qcow2 writer writes, stock qemu reads back exactly
(random data, zero and compressed extents, odd disk sizes, over a backing file or not),
and ``qemu-img check`` finds nothing wrong."""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.qcow2 import Qcow2Writer
from integration.harness.chain import qemu_img_check

CLUSTER = 65536
KINDS = ("data", "zero", "compressed")


@st.composite
def images(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, str, int]], bool]:
    """(virtual size, [(first cluster, clusters, kind, seed)], over a backing file)."""
    # disks are whole 512-byte sectors (qemu reads a qcow2's size rounded down to them)
    size = draw(st.integers(1, 48)) * CLUSTER - 512 * draw(st.sampled_from([0, 0, 1, 8, 127]))
    clusters = -(-size // CLUSTER)
    cuts = sorted(draw(st.sets(st.integers(0, clusters), max_size=12)) | {0, clusters})
    runs = []
    for start, end in itertools.pairwise(cuts):
        kind = draw(st.sampled_from((*KINDS, "skip")))
        if kind != "skip":
            runs.append((start, end - start, kind, draw(st.integers(0, 255))))
    return size, runs, draw(st.booleans())


def _content(seed: int, length: int) -> bytes:
    """Compressible but not constant data (every 4 KiB block different)."""
    block = bytes((seed + i) % 251 for i in range(4096))
    return (block * (-(-length // 4096)))[:length]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(images())
def test_qemu_reads_back_what_the_writer_wrote(
    image: tuple[int, list[tuple[int, int, str, int]], bool],
) -> None:
    size, runs, with_backing = image
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        expected = bytearray(size)
        backing = None
        if with_backing:
            backing = folder / "base.raw"
            base = os.urandom(size)
            backing.write_bytes(base)
            expected[:] = base
        writer = Qcow2Writer(
            folder / "top.qcow2",
            size,
            cluster_size=CLUSTER,
            backing_file=backing.name if backing else None,
            backing_format="raw",
        ).open()
        for first, count, kind, seed in runs:
            offset = first * CLUSTER
            length = min(count * CLUSTER, size - offset)
            if kind == "zero":
                writer.write_zeroes(offset, length)
                expected[offset : offset + length] = bytes(length)
                continue
            data = _content(seed, length)
            expected[offset : offset + length] = data
            if kind == "data":
                os.pwrite(writer.fd, data, writer.allocate(offset, length))
                continue
            for rel in range(0, length, CLUSTER):  # compressed: cluster by cluster
                piece = data[rel : rel + CLUSTER]
                packed = writer.compress(piece + bytes(CLUSTER - len(piece)))
                if packed is None:
                    os.pwrite(writer.fd, piece, writer.allocate(offset + rel, len(piece)))
                else:
                    os.pwrite(writer.fd, packed, writer.place_compressed(offset + rel, packed))
        writer.finish()
        qemu_img_check(folder / "top.qcow2")
        raw = folder / "out.raw"
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                str(folder / "top.qcow2"),
                str(raw),
            ],
            check=True,
            capture_output=True,
        )
        got = raw.read_bytes()
        assert len(got) == size
        if got != bytes(expected):
            first = next(i for i in range(size) if got[i] != expected[i])
            raise AssertionError(f"differs at byte {first} (runs {runs}, size {size})")

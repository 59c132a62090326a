"""Property: whatever the streaming qcow2 writer writes, stock qemu reads back exactly
(random data, zero and compressed extents, odd disk sizes, over a backing file or not),
and ``qemu-img check`` finds nothing wrong; encrypted (LUKS) too, with the key."""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.qcow2 import Qcow2Writer
from backupd.qcow2.encryption import ImageKey, KeySpec
from integration.harness.chain import first_difference, qemu_img_check

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


def _backing(folder: Path, size: int, wanted: bool, expected: bytearray) -> Path | None:
    """A raw backing file of random bytes (``wanted``), which ``expected`` starts as."""
    if not wanted:
        return None
    backing = folder / "base.raw"
    base = os.urandom(size)
    backing.write_bytes(base)
    expected[:] = base
    return backing


def _data_runs(
    writer: Qcow2Writer, runs: list[tuple[int, int, str, int]], size: int, expected: bytearray
) -> Iterator[tuple[int, str, bytes]]:
    """Write the zero runs, and yield (guest offset, kind, data) of the others for the
    caller to store; ``expected`` holds what qemu must read back after all of them."""
    for first, count, kind, seed in runs:
        offset = first * CLUSTER
        length = min(count * CLUSTER, size - offset)
        if kind == "zero":
            writer.write_zeroes(offset, length)
            expected[offset : offset + length] = bytes(length)
            continue
        data = _content(seed, length)
        expected[offset : offset + length] = data
        yield offset, kind, data


def _assert_read_back(got: bytes, expected: bytearray, runs: object, size: int) -> None:
    assert len(got) == size
    first = first_difference(got, bytes(expected))
    if first is not None:
        raise AssertionError(f"differs at byte {first} (runs {runs}, size {size})")


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
        backing = _backing(folder, size, with_backing, expected)
        writer = Qcow2Writer(
            folder / "top.qcow2",
            size,
            cluster_size=CLUSTER,
            backing_file=backing.name if backing else None,
            backing_format="raw",
        ).open()
        for offset, kind, data in _data_runs(writer, runs, size, expected):
            if kind == "data":
                os.pwrite(writer.fd, data, writer.allocate(offset, len(data)))
                continue
            for rel in range(0, len(data), CLUSTER):  # compressed: cluster by cluster
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
        _assert_read_back(raw.read_bytes(), expected, runs, size)


def _stock_qemu_read(image: Path, key: Path, out: Path, backing: bool) -> bytes:
    """qemu-img convert with the key (``backing``: over a plain raw file)."""
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"
    if backing:
        opts += ",backing.driver=raw"
    subprocess.run(
        ["qemu-img", "convert", "--object", f"secret,id=s0,file={key}", "--image-opts", opts,
         "-O", "raw", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(images(), st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b))
def test_qemu_reads_back_what_the_writer_encrypted(
    image: tuple[int, list[tuple[int, int, str, int]], bool], passphrase: bytes
) -> None:
    """Encrypted (LUKS, AES-XTS from host offsets): random extents, odd sizes, zero runs;
    qemu with the key reads back exactly what was written, and no data is in the file."""
    size, runs, with_backing = image
    passphrase = passphrase.decode("latin-1").encode()  # any text qemu takes (UTF-8)
    key, region = ImageKey.new(KeySpec(passphrase, iterations=1000))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key_file = folder / "key"
        key_file.write_bytes(passphrase)
        expected = bytearray(size)
        backing = _backing(folder, size, with_backing, expected)
        writer = Qcow2Writer(
            folder / "top.qcow2", size, cluster_size=CLUSTER, luks_region=region,
            backing_file=backing.name if backing else None, backing_format="raw",
        ).open()  # fmt: skip
        for offset, _, data in _data_runs(writer, runs, size, expected):
            host = writer.allocate(offset, len(data))
            sealed = bytearray(data)
            key.cipher.encrypt(sealed, host)  # whole sectors: disks are
            os.pwrite(writer.fd, sealed, host)
        writer.finish()
        stored = (folder / "top.qcow2").read_bytes()
        for _, _, kind, seed in runs:
            if kind != "zero":
                assert _content(seed, 4096)[:64] not in stored
        got = _stock_qemu_read(folder / "top.qcow2", key_file, folder / "out.raw", with_backing)
        _assert_read_back(got, expected, runs, size)

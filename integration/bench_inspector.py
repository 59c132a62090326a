"""What the repository gate costs: the qcow2 inspector (and the whole gate, with the
manifest and the path checks) on a full backup of 2 GiB of data, beside ``qemu-img
check`` and ``qemu-img convert`` of the same file (what verify and restore then do).
A second image maps 64 GiB of clusters sparsely (the tables of a 64 GiB full backup
without its data) to show how the inspector grows with the number of clusters.

    .venv/bin/python -m integration.bench_inspector [--dir /var/tmp] [--gib 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from backupd.chain import chain_files
from backupd.digests import hexdigest
from backupd.manifest import DigestRun, DiskRecord, Manifest
from backupd.qcow2.inspector import inspect_image
from backupd.qcow2.writer import Qcow2Writer
from backupd.repository import Repository

CLUSTER = 65536
CHUNK = 8 << 20
BACKUP = "20260101T000000Z"


def write_image(path: Path, size: int, *, data: bool) -> list[DigestRun]:
    """A full backup of ``size`` bytes, every cluster mapped (``data``: real bytes)."""
    writer = Qcow2Writer(path, size).open()
    runs = []
    block = os.urandom(CHUNK)
    for offset in range(0, size, CHUNK):
        host = writer.allocate(offset, CHUNK)
        if data:
            os.pwrite(writer.fd, block, host)
            runs.append(DigestRun(host, CHUNK, offset, hexdigest(block)))
    writer.finish()
    return runs


def manifest(vm: str, size: int, runs: list[DigestRun]) -> Manifest:
    record = DiskRecord(
        name="vda",
        file="vda.qcow2",
        node="drive-vda",
        virtual_size=size,
        cluster_size=CLUSTER,
        bytes_copied=size,
        bytes_stored=size,
        data_extents=1,
        zero_extents=0,
        digests=tuple(runs),
        digest_algorithm="blake3",
    )
    return Manifest(
        id=BACKUP,
        vm=vm,
        kind="full",
        parent=None,
        created="2026-01-01T00:00:00Z",
        qemu_version="7.2",
        reason="bench",
        quiesced=False,
        duration=1.0,
        disks={"vda": record},
    )


def timed(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def inspect(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        inspect_image(fd)
    finally:
        os.close(fd)


def run(folder: Path, gib: int) -> None:
    repo = Repository(folder / "repo")
    cases = [("data", gib << 30, True), ("sparse", 64 << 30, False)]
    for vm, size, data in cases:
        backup = folder / "repo" / vm / BACKUP
        backup.mkdir(parents=True)
        runs = write_image(backup / "vda.qcow2", size, data=data)
        (backup / "manifest.json").write_text(manifest(vm, size, runs).to_json())
    image = folder / "repo" / "data" / BACKUP / "vda.qcow2"
    vm_repo = repo.vm("data")
    gate = timed(lambda: chain_files(vm_repo, vm_repo.load(BACKUP), "vda"), 5)
    inspector = timed(lambda: inspect(image), 5)
    check = timed(
        lambda: subprocess.run(["qemu-img", "check", "-U", str(image)], check=True, stdout=-3), 3
    )
    out = folder / "out.raw"

    def convert() -> None:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)], check=True)
        out.unlink()

    copy = timed(convert, 2)
    sparse = folder / "repo" / "sparse" / BACKUP / "vda.qcow2"
    big = timed(lambda: inspect(sparse), 3)
    print(f"{gib} GiB full backup, {image.stat().st_size >> 20} MiB file, 64 KiB clusters:")
    print(f"  inspector (header, L1, L2, refcount table)  {inspector * 1000:8.1f} ms")
    print(f"  the whole gate (manifest, paths, inspector) {gate * 1000:8.1f} ms")
    print(f"  qemu-img check                              {check * 1000:8.1f} ms")
    print(f"  qemu-img convert -O raw (a restore's copy)  {copy * 1000:8.1f} ms")
    print("64 GiB of mapped clusters (1M L2 entries, sparse file):")
    print(f"  inspector                                   {big * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--gib", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-inspector-") as folder:
        run(Path(folder), args.gib)


if __name__ == "__main__":
    main()

"""Offline backups beside online ones, on the same disk, with ``qemu-img convert`` as
the reference for reading a whole image.

    .venv/bin/python -m integration.bench_offline [--rounds 3] [--size-gib 2]

One VM with one qcow2 disk holding random data in 1 MiB runs over half of it.  Each
round, alternating sources on the same image:

- online: ``backupd run --full`` of the running VM, 1% of the disk rewritten through
  the guest device, ``backupd run`` (incremental), and once more with nothing changed;
- the VM shut down: ``backupd run --full`` offline, 1% rewritten with qemu-io on the
  image (it records into the persistent bitmaps as qemu does), ``backupd run``
  (incremental), and once more with nothing changed (the fixed cost of an offline run:
  starting and stopping qemu-storage-daemon);
- ``qemu-img convert -O qcow2`` of the image while the VM is off (the plain way to copy
  an offline disk, with no incremental).

Prints medians of the whole command's wall time and, for backupd, of its copy phase
(``copy_seconds`` in the manifest).  The machine is shared and noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from integration.bench import backupd_cmd, copy_seconds, make_disk, med, timed
from integration.harness.vm import QemuVM

MiB = 1 << 20
GiB = 1 << 30
CHANGE = 512 * 1024


def changes(size: int, rng: random.Random) -> list[int]:
    """Offsets of 1% of the disk in 512 KiB writes."""
    count = max(1, size // 100 // CHANGE)
    return sorted(rng.randrange(0, size // CHANGE) * CHANGE for _ in range(count))


def clear_backups(repo: Path) -> None:
    for folder in (repo / "guest1").glob("2*"):
        shutil.rmtree(folder)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // MiB * MiB
    work = Path(tempfile.mkdtemp(prefix="backupd-bench-offline-", dir=args.workdir))
    sockets = Path(tempfile.mkdtemp(prefix="bkd-bo-", dir="/tmp"))
    rng = random.Random(5)
    try:
        image = work / "vm" / "vda.qcow2"
        image.parent.mkdir()
        runs = [(o * MiB, MiB) for o in range(0, size // MiB, 2)]
        data = make_disk(image, size, runs, seed=1)
        vm = QemuVM(work / "vm", {"vda": size}, sockdir=sockets)
        vm.model = {}  # writes go through qemu-io here; no byte model needed
        config = work / "backupd.yaml"
        repo = work / "repo"
        config.write_text(
            yaml.safe_dump(
                {
                    "repository": str(repo),
                    "scratch_dir": str(work / "scratch"),
                    "runtime_dir": str(sockets),
                    "vms": {"guest1": {"qmp": str(vm.qmp_path), "images": {"vda": str(image)}}},
                }
            )
        )
        times: dict[str, list[float]] = {}

        def note(name: str, took: float, copy: float | None = None) -> None:
            times.setdefault(name, []).append(took)
            if copy is not None:
                times.setdefault(f"{name} (copy phase)", []).append(copy)

        def ours(name: str, *extra: str) -> None:
            took, _ = timed(backupd_cmd(config, "run", "--vm", "guest1", *extra))
            note(name, took, copy_seconds(repo))

        # warm the host's cache of the image, so no tool pays for a cold first read
        with open(image, "rb") as f:
            while f.read(8 * MiB):
                pass
        try:
            for round_ in range(args.rounds):
                clear_backups(repo)
                await vm.start()
                ours("online full", "--full")
                for offset in changes(size, rng):
                    await vm.qemu_io("vda", f"write -P {round_ + 1:#x} {offset} {CHANGE}")
                ours("online incremental (1% changed)")
                ours("online incremental (nothing changed)")
                await vm.quit()
                ours("offline full", "--full")
                writes = [
                    arg
                    for offset in changes(size, rng)
                    for arg in ("-c", f"write -P {round_ + 9:#x} {offset} {CHANGE}")
                ]
                subprocess.run(
                    ["qemu-io", "-f", "qcow2", *writes, str(image)],
                    check=True,
                    capture_output=True,
                )
                ours("offline incremental (1% changed)")
                ours("offline incremental (nothing changed)")
                out = work / "convert.qcow2"
                # synced like backupd's files, which are fsynced before the commit
                script = f"qemu-img convert -O qcow2 '{image}' '{out}' && sync -f '{out}'"
                took, _ = timed(["sh", "-c", script])
                out.unlink()
                note("qemu-img convert -O qcow2 + sync of the image (offline)", took)
        finally:
            await vm.kill()
        print(
            f"\n{args.size_gib:g} GiB qcow2 disk, {data / GiB:.2f} GiB of data, "
            f"{args.rounds} rounds, medians:"
        )
        for name, values in times.items():
            rate = ""
            if "full" in name or "convert" in name:
                rate = f"  {data / MiB / med(values):7.0f} MiB/s"
            print(f"  {name:<58} {med(values):7.2f} s{rate}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

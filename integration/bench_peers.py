"""Benchmark cases beside the peers and at scale (run from :mod:`integration.bench`):

- **qmpbackup** (plain qemu over QMP like backupd, but qemu copies the data itself with
  ``blockdev-backup`` into a qcow2 target): full and incremental backups of the same VM
  with the same writes, the two tools alternating.  It needs a checkout of its source
  (``--qmpbackup DIR``, with a virtualenv of its own in ``DIR/venv`` holding
  ``qemu.qmp`` and ``colorlog``); it is never part of this repository.
- **scale**: an incremental of 1 MiB changed (16 scattered 64 KiB writes) on a 64 GiB
  disk with 65,536 data extents beside the same on a 1 GiB disk with 1,024: its cost
  must follow what changed, not the disk's allocation map.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from integration.bench_common import backupd_cmd, med, row, timed
from integration.harness.vm import QemuVM

if TYPE_CHECKING:
    from integration.bench import Bench

MiB = 1 << 20
GiB = 1 << 30


def sparse_disk(path: Path, size: int, every: int, data: int = 4096) -> None:
    """A qcow2 of ``size`` with ``data`` bytes every ``every`` bytes: ``size / every``
    separate data extents (4 KiB clusters, so the data stays small)."""
    raw = path.with_suffix(".raw")
    blob = os.urandom(data)
    with open(raw, "wb") as file:
        file.truncate(size)
        for offset in range(0, size, every):
            file.seek(offset)
            file.write(blob)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
         str(raw), str(path)],
        check=True,
    )  # fmt: skip
    raw.unlink()


async def scatter(vm: QemuVM, size: int, writes: int, rng: random.Random, pattern: int) -> None:
    for _ in range(writes):
        offset = rng.randrange(0, size // 65536) * 65536
        await vm.qemu_io("vda", f"write -P {pattern} {offset} 64k")


Step = Callable[[], Awaitable[None]]


async def alternate(rounds: int, first: Step, second: Step) -> None:
    """``rounds`` of both steps, the one that goes first alternating."""
    for round_ in range(rounds):
        for step in (first, second) if round_ % 2 == 0 else (second, first):
            await step()


async def scale_case(bench: Bench) -> None:
    big, small = bench.work / "big.qcow2", bench.work / "small.qcow2"
    await asyncio.to_thread(sparse_disk, big, 64 * GiB, MiB)
    await asyncio.to_thread(sparse_disk, small, GiB, MiB)
    times: dict[str, list[float]] = {"big": [], "small": []}
    vms = {"big": await bench.start_vm("big", {"vda": big})}
    vms["small"] = await bench.start_vm("small", {"vda": small})
    try:
        configs = {name: bench.config(vm, f"scale-{name}") for name, vm in vms.items()}
        for config in configs.values():
            timed(backupd_cmd(config, "run", "--vm", "guest1", "--full"))
        rng = random.Random(11)

        def one(name: str, size: int, r: int) -> Step:
            async def step() -> None:
                await scatter(vms[name], size, 16, rng, r + 1)
                took, _ = timed(backupd_cmd(configs[name], "run", "--vm", "guest1"))
                times[name].append(took)

            return step

        for r in range(bench.rounds):
            await alternate(1, one("big", 64 * GiB, r), one("small", GiB, r))
        big_s, small_s = med(times["big"]), med(times["small"])
        row("incremental, 1 MiB dirty, 64 GiB disk with 65,536 extents", f"{big_s:6.2f} s")
        row("incremental, 1 MiB dirty, 1 GiB disk with 1,024 extents", f"{small_s:6.2f} s")
        row("ratio 64 GiB / 1 GiB (target <= 1.5)", f"{big_s / small_s:.2f}x")
    finally:
        for vm in vms.values():
            await vm.kill()
        big.unlink(missing_ok=True)
        small.unlink(missing_ok=True)


def qmpbackup_cmd(checkout: Path, vm: QemuVM, *args: str) -> list[str]:
    python = checkout / "venv" / "bin" / "python"
    return [str(python), str(checkout / "qmpbackup"), "--socket", str(vm.qmp_path), *args]


async def qmpbackup_case(bench: Bench, image: Path, data: int, checkout: Path) -> None:
    """backupd and qmpbackup on one VM: full backups, then incrementals of the same
    40 MiB of 64 KiB writes, the two alternating who goes first."""
    vm = await bench.start_vm("peers", {"vda": image})
    target = bench.work / "qmpbackup"
    ours: dict[str, list[float]] = {"full": [], "inc": []}
    theirs: dict[str, list[float]] = {"full": [], "inc": []}

    def backupd(level: str) -> Callable[[], Awaitable[None]]:
        async def step() -> None:
            args = ("--full",) if level == "full" else ("--incremental",)
            config = bench.config(vm, "peers")
            ours[level].append(timed(backupd_cmd(config, "run", "--vm", "guest1", *args))[0])

        return step

    def qmpbackup(level: str) -> Callable[[], Awaitable[None]]:
        async def step() -> None:
            if level == "full":
                shutil.rmtree(target, ignore_errors=True)
                timed(qmpbackup_cmd(checkout, vm, "cleanup", "--remove-bitmap"))
            command = ("backup", "--level", level, "--target", str(target))
            theirs[level].append(timed(qmpbackup_cmd(checkout, vm, *command))[0])

        return step

    try:
        await alternate(bench.rounds, backupd("full"), qmpbackup("full"))
        # both chains start at the same instant: every incremental sees the same writes
        rng = random.Random(13)
        for r in range(bench.rounds):
            await scatter(vm, 4 * GiB, 640, rng, r + 1)  # 40 MiB
            steps = (backupd("inc"), qmpbackup("inc"))
            for step in steps if r % 2 == 0 else reversed(steps):
                await step()
    finally:
        await vm.kill()
        shutil.rmtree(target, ignore_errors=True)
    mib = data / MiB
    for level, what in (("full", "full, 2 GiB of data"), ("inc", "incremental, 40 MiB dirty")):
        row(f"{what}: backupd", f"{med(ours[level]):6.2f} s")
        row(f"{what}: qmpbackup", f"{med(theirs[level]):6.2f} s")
        ratio = med(theirs[level]) / med(ours[level])
        row(f"{what}: speed backupd/qmpbackup (target >= 1.0)", f"{ratio:.2f}x")
    row("full: backupd data rate", f"{mib / med(ours['full']):7.0f} MiB/s")


def check_qmpbackup(checkout: Path) -> None:
    python = checkout / "venv" / "bin" / "python"
    if not (checkout / "qmpbackup").is_file() or not python.exists():
        sys.exit(
            f"bench: --qmpbackup {checkout}: expected a qmpbackup source checkout with a "
            "virtualenv in venv/ (python3 -m venv venv && venv/bin/pip install qemu.qmp colorlog)"
        )

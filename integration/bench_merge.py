"""Speed of a merge: folding a 40 MiB incremental into a 2 GiB full (what ``prune`` does
every day with ``keep_last``), beside a fresh full backup of the same disk.

    .venv/bin/python -m integration.bench_merge [--rounds 3]

Prints the time of ``backupd prune`` (one merge each round), the bytes it wrote (the
process and its qemu-img, from the kernel's I/O accounting of waited-for children) as
a multiple of the increment, and the time of ``backupd run --full`` of the disk.
Targets: a merge under 0.5 s, and under 2x the increment's size written.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from integration.bench_common import ROWS, backupd_cmd, make_disk, med, row
from integration.harness.vm import QemuVM

MiB = 1 << 20
GiB = 1 << 30


def written_by_children() -> int:
    """Bytes written so far by this process's finished children (512-byte blocks)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    for line in proc.stderr.splitlines():
        if " merged " in line:
            print(f"  {line}")
    return took


async def bench(rounds: int, folder: Path) -> None:
    disk = folder / "vda.qcow2"
    runs = [(i * 2 * MiB, MiB) for i in range(2048)]  # 2 GiB of data in a 4 GiB disk
    make_disk(disk, 4 * GiB, runs, seed=5)
    sockets = Path(tempfile.mkdtemp(prefix="bkd-merge-", dir="/tmp"))
    vm = QemuVM(folder / "vm", {"vda": 0}, sockdir=sockets)
    vm.images = {"vda": disk}
    vm.model = {}
    vm.workdir.mkdir()
    await vm.start()
    try:
        config = folder / "backupd.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "repository": str(folder / "repo"),
                    "scratch_dir": str(folder / "scratch"),
                    "runtime_dir": str(sockets),
                    "vms": {"guest1": {"qmp": str(vm.qmp_path), "keep_last": 1}},
                }
            )
        )
        full = run(backupd_cmd(config, "run", "--vm", "guest1", "--full"))
        rng = random.Random(3)
        merges, ratios = [], []
        for round_ in range(rounds):
            for _ in range(160):  # 40 MiB in 256 KiB writes over the disk
                offset = rng.randrange(0, 4 * GiB // (256 << 10)) * (256 << 10)
                await vm.qemu_io("vda", f"write -P {round_ + 1} {offset} 256k")
            run(backupd_cmd(config, "run", "--vm", "guest1"))
            before = written_by_children()
            prune = [sys.executable, "-m", "backupd", "-c", str(config), "prune", "--vm", "guest1"]
            merges.append(run(prune))
            ratios.append((written_by_children() - before) / (40 * MiB))
        row(
            "merge of a 40 MiB incremental into a 2 GiB full (target < 0.5 s)",
            f"{med(merges):6.2f} s",
        )
        row("bytes written by the merge / increment (target < 2)", f"{med(ratios):6.2f}x")
        row("a fresh full backup of that disk", f"{full:6.2f} s")
    finally:
        await vm.kill()
        shutil.rmtree(sockets, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the disk and repository go")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="backupd-bench-merge-", dir=args.dir))
    try:
        asyncio.run(bench(args.rounds, folder))
        for name, value in ROWS:
            print(f"| {name:<66} | {value:>10} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Speed benchmark: backupd and nbdclient beside the C reference tools, on real qemu.

    .venv/bin/python -m integration.bench [--rounds 3] [--size-gib 4]

Each pair is measured side by side, alternating, several rounds; the table shows
medians and ratios (the machines are shared and noisy: only ratios from one run mean
something).  Cases:

1. full backup of a 4 GiB qcow2 disk, 50% random data in 1 MiB runs:
   ``backupd run --full`` vs ``nbdcopy`` of the same fleecing export (to a raw file,
   flushed) vs ``qemu-img convert -O qcow2`` of it
2. the same with 64 KiB runs scattered over the disk (25% allocated)
3. incremental after 1% of the disk was rewritten in scattered 64 KiB writes, and an
   incremental with nothing dirty (the fixed cost of a run)
4. 16 GiB virtual disk holding 1% data vs a 1 GiB disk holding the same data
5. four 1 GiB disks in one VM: one run vs the four disks one after another
6. ``nbdclient copy`` vs ``nbdcopy`` of the same export (to null:)
7. ``backupd restore`` (raw) vs ``qemu-img convert`` of the same served chain
8. an incremental of 1 MiB on a 64 GiB disk with 65,536 extents vs a 1 GiB disk with
   1,024 (:mod:`integration.bench_peers`)
9. ``prune`` merging a 40 MiB incremental into a 2 GiB full (:mod:`integration.bench_merge`)
10. with ``--qmpbackup DIR``: full and incremental backups beside qmpbackup on one VM
    (:mod:`integration.bench_peers`)

and the peak RSS of backupd in cases 1, 4 and 5.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from backupd.config import load_config
from backupd.qemu.fleece import fleece_session
from backupd.qemu.inventory import select_disks
from backupd.qemu.qmp import QemuMonitor
from integration import bench_merge, bench_peers
from integration.bench_common import (
    ROWS,
    GiB,
    MiB,
    backupd_cmd,
    copy_seconds,
    installed_like,
    make_disk,
    med,
    row,
    timed,
)
from integration.harness.servers import qemu_nbd
from integration.harness.vm import QemuVM


class Bench:
    def __init__(self, work: Path, rounds: int, settings: dict[str, object]) -> None:
        self.work = work
        self.rounds = rounds
        self.settings = settings
        self.sockets = Path(tempfile.mkdtemp(prefix="bkd-bench-", dir="/tmp"))

    def config(
        self, vm: QemuVM, name: str, vms: dict[str, dict[str, object]] | None = None
    ) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "repository": str(self.work / f"repo-{name}"),
                    "scratch_dir": str(self.work / "scratch"),
                    "runtime_dir": str(self.sockets),
                    "vms": vms or {"guest1": {"qmp": str(vm.qmp_path)}},
                    **self.settings,
                }
            )
        )
        return path

    async def start_vm(self, name: str, disks: dict[str, Path]) -> QemuVM:
        sock = self.sockets / name
        sock.mkdir()
        vm = QemuVM(self.work / name, {d: 0 for d in disks}, sockdir=sock)
        vm.images = dict(disks)
        vm.model = {}
        vm.workdir.mkdir(exist_ok=True)
        return await vm.start()

    async def fleece_copy(
        self, vm: QemuVM, config: Path, command: Callable[[str, Path], list[str]]
    ) -> float:
        """Time a reference tool on backupd's own fleecing export of vda."""
        cfg = load_config(config)
        monitor = QemuMonitor(str(vm.qmp_path))
        await monitor.connect()
        try:
            disks = await select_disks(monitor, None)
            sockdir = Path(tempfile.mkdtemp(dir=self.sockets))
            async with fleece_session(
                monitor,
                disks,
                backup_id="bench",
                bitmap="backupd-bench",
                parent_bitmap=None,
                scratch_dir=cfg.scratch_dir,
                socket_dir=sockdir,
            ) as ex:
                out = self.work / "ref.out"
                took, _ = await asyncio.to_thread(timed, command(ex[0].uri, out))
                out.unlink(missing_ok=True)
            for bitmap in await vm.bitmaps("vda"):
                if bitmap["name"] == "backupd-bench":
                    await monitor.execute(
                        "block-dirty-bitmap-remove", {"node": "drive-vda", "name": "backupd-bench"}
                    )
            return took
        finally:
            await monitor.close()

    async def full_case(self, label: str, image: Path, data: int) -> tuple[float, float, int]:
        """Median seconds of the whole run and of its copy phase, and the peak RSS (KiB)."""
        vm = await self.start_vm(label, {"vda": image})
        try:
            config = self.config(vm, label)
            ours: list[float] = []
            ours_copy: list[float] = []
            nbdcopy: list[float] = []
            convert: list[float] = []
            rss = 0
            # warm the host's cache of the image, so no tool pays for a cold first read
            await self.fleece_copy(vm, config, lambda uri, out: ["nbdcopy", uri, "null:"])

            async def run_ours() -> None:
                nonlocal rss
                took, peak = await asyncio.to_thread(
                    timed, backupd_cmd(config, "run", "--vm", "guest1", "--full")
                )
                ours.append(took)
                ours_copy.append(copy_seconds(self.work / f"repo-{label}"))
                rss = max(rss, peak)

            async def run_nbdcopy() -> None:
                nbdcopy.append(
                    await self.fleece_copy(
                        vm, config, lambda uri, out: ["nbdcopy", "--flush", uri, str(out)]
                    )
                )

            for round_ in range(self.rounds):
                # alternate who goes first: page-cache state favours neither
                first, second = (
                    (run_ours, run_nbdcopy) if round_ % 2 == 0 else (run_nbdcopy, run_ours)
                )
                await first()
                await second()
                if not convert:  # 2-4x slower than both: timed once, a reference
                    convert.append(
                        await self.fleece_copy(
                            vm,
                            config,
                            lambda uri, out: ["qemu-img", "convert", "-O", "qcow2", uri, str(out)],
                        )
                    )
                shutil.rmtree(self.work / f"repo-{label}")
            mib = data / MiB
            row(
                f"{label}: backupd run --full (median s, data MiB/s)",
                f"{med(ours):6.2f} s  {mib / med(ours):7.0f} MiB/s",
            )
            row(
                f"{label}: nbdcopy --flush of the fleecing export",
                f"{med(nbdcopy):6.2f} s  {mib / med(nbdcopy):7.0f} MiB/s",
            )
            row(
                f"{label}: qemu-img convert -O qcow2 of the fleecing export (once)",
                f"{med(convert):6.2f} s  {mib / med(convert):7.0f} MiB/s",
            )
            row(f"{label}: ratio backupd/nbdcopy throughput", f"{med(nbdcopy) / med(ours):.2f}x")
            row(
                f"{label}: backupd's copy phase alone (from its manifest)",
                f"{med(ours_copy):6.2f} s  {mib / med(ours_copy):7.0f} MiB/s",
            )
            row(
                f"{label}: ratio backupd copy phase/nbdcopy throughput",
                f"{med(nbdcopy) / med(ours_copy):.2f}x",
            )
            row(f"{label}: ratio backupd/qemu-img throughput", f"{med(convert) / med(ours):.2f}x")
            return med(ours), med(ours_copy), rss
        finally:
            await vm.kill()

    async def incremental_case(self, image: Path) -> tuple[float, float]:
        """Dirty MiB/s of the whole run and of its copy phase."""
        vm = await self.start_vm("incr", {"vda": image})
        try:
            config = self.config(vm, "incr")
            timed(backupd_cmd(config, "run", "--vm", "guest1", "--full"))
            size = 4 * GiB
            rng = random.Random(7)
            runs = sorted(rng.sample(range(size // 65536), (size // 100) // 65536))
            dirty: list[float] = []
            dirty_copy: list[float] = []
            empty: list[float] = []
            for r in range(self.rounds):
                for index in runs:
                    await vm.hmp(
                        f'qemu-io -d vda/virtio-backend "write -P {r + 1} {index * 65536} 64k"'
                    )
                took, _ = timed(backupd_cmd(config, "run", "--vm", "guest1", "--incremental"))
                dirty.append(took)
                dirty_copy.append(copy_seconds(self.work / "repo-incr"))
                took, _ = timed(backupd_cmd(config, "run", "--vm", "guest1", "--incremental"))
                empty.append(took)
            mib = len(runs) * 65536 / MiB
            row(
                f"incremental, 1% dirty ({mib:.0f} MiB in 64 KiB writes)",
                f"{med(dirty):6.2f} s  {mib / med(dirty):7.0f} MiB/s",
            )
            row(
                "incremental, 1% dirty: copy phase alone (from its manifest)",
                f"{med(dirty_copy):6.2f} s  {mib / med(dirty_copy):7.0f} MiB/s",
            )
            row("incremental with nothing dirty (fixed cost of a run)", f"{med(empty):6.2f} s")
            return mib / med(dirty), mib / med(dirty_copy)
        finally:
            await vm.kill()

    async def sparse_case(self) -> None:
        big = self.work / "big16.qcow2"
        small = self.work / "small1.qcow2"
        big_runs = [(i * (16 * GiB // 160), MiB) for i in range(160)]
        small_runs = [(i * (GiB // 160) // MiB * MiB, MiB) for i in range(160)]
        make_disk(big, 16 * GiB, big_runs, 3)
        make_disk(small, GiB, small_runs, 3)
        results = {}
        rss = 0
        for label, image in (("16g", big), ("1g", small)):
            vm = await self.start_vm(f"sparse-{label}", {"vda": image})
            try:
                config = self.config(vm, f"sparse-{label}")
                times = []
                for _ in range(self.rounds):
                    took, peak = timed(backupd_cmd(config, "run", "--vm", "guest1", "--full"))
                    times.append(took)
                    rss = max(rss, peak) if label == "16g" else rss
                    shutil.rmtree(self.work / f"repo-sparse-{label}")
                results[label] = med(times)
            finally:
                await vm.kill()
        row("16 GiB virtual, 160 MiB data: full backup", f"{results['16g']:6.2f} s")
        row("1 GiB virtual, same 160 MiB data: full backup", f"{results['1g']:6.2f} s")
        row("ratio 16 GiB / 1 GiB (target <= 1.5)", f"{results['16g'] / results['1g']:.2f}x")
        row("peak RSS, 16 GiB disk full backup", f"{rss / 1024:.0f} MiB")
        big.unlink()
        small.unlink()

    async def parallel_case(self) -> None:
        images = {}
        for i, name in enumerate(("vda", "vdb", "vdc", "vdd")):
            image = self.work / f"par-{name}.qcow2"
            make_disk(image, GiB, [(o * MiB, MiB) for o in range(0, 1024, 2)], 10 + i)
            images[name] = image
        vm = await self.start_vm("par", images)
        try:
            together = self.config(vm, "par")
            apart = self.config(
                vm,
                "apart",
                {f"part-{name}": {"qmp": str(vm.qmp_path), "disks": [name]} for name in images},
            )
            one: list[float] = []
            four: list[float] = []
            rss = 0
            for _ in range(self.rounds):
                took, peak = timed(backupd_cmd(together, "run", "--vm", "guest1", "--full"))
                one.append(took)
                rss = max(rss, peak)
                start = time.perf_counter()
                for name in images:
                    timed(backupd_cmd(apart, "run", "--vm", f"part-{name}", "--full"))
                four.append(time.perf_counter() - start)
                shutil.rmtree(self.work / "repo-par")
                shutil.rmtree(self.work / "repo-apart")
            row("four 1 GiB disks (2 GiB data), one run", f"{med(one):6.2f} s")
            row("the same four disks one after another", f"{med(four):6.2f} s")
            row("speed-up of parallel disks (target >= 1.5)", f"{med(four) / med(one):.2f}x")
            row("peak RSS, four disks in one run", f"{rss / 1024:.0f} MiB")
        finally:
            await vm.kill()
            for image in images.values():
                image.unlink()

    async def copy_case(self, image: Path, data: int) -> None:
        ours: list[float] = []
        theirs: list[float] = []
        with qemu_nbd(image, self.sockets / "copy.sock", shared=8) as uri:
            timed(["nbdcopy", uri, "null:"])  # warm the host's cache of the image
            for round_ in range(self.rounds):
                pair = [
                    (ours, [sys.executable, "-m", "nbdclient", "copy", "-q", uri, "null:"]),
                    (theirs, ["nbdcopy", uri, "null:"]),
                ]
                for results, command in pair if round_ % 2 == 0 else pair[::-1]:
                    results.append(timed(command)[0])
        mib = data / MiB
        row("nbdclient copy (to null:)", f"{med(ours):6.2f} s  {mib / med(ours):7.0f} MiB/s")
        row("nbdcopy (to null:)", f"{med(theirs):6.2f} s  {mib / med(theirs):7.0f} MiB/s")
        row("ratio nbdclient/nbdcopy throughput", f"{med(theirs) / med(ours):.2f}x")

    async def restore_case(self, image: Path, data: int) -> None:
        vm = await self.start_vm("restore", {"vda": image})
        try:
            config = self.config(vm, "restore")
            timed(backupd_cmd(config, "run", "--vm", "guest1", "--full"))
            await vm.hmp('qemu-io -d vda/virtio-backend "write -P 9 0 64M"')
            timed(backupd_cmd(config, "run", "--vm", "guest1"))
        finally:
            await vm.kill()
        ours: list[float] = []
        theirs: list[float] = []
        out = self.work / "restored.raw"
        sock = self.sockets / "serve.sock"
        serve = subprocess.Popen(
            backupd_cmd(config, "serve", "--vm", "guest1", "--socket", str(sock)),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert serve.stdout is not None
            uri = serve.stdout.readline().strip()
            qemu_img = ["qemu-img", "convert", "-O", "raw", uri, str(out)]
            restore = backupd_cmd(
                config, "restore", "--vm", "guest1", "--disk", "vda", "--output", str(out)
            )
            out.unlink(missing_ok=True)
            timed(["nbdcopy", uri, "null:"])  # warm the host's cache of the chain
            for round_ in range(self.rounds):
                pair = [(ours, restore), (theirs, qemu_img)]
                for results, command in pair if round_ % 2 == 0 else pair[::-1]:
                    results.append(timed(command)[0])
                    out.unlink()
        finally:
            serve.terminate()
            serve.wait(10)
        mib = data / MiB
        row(
            "backupd restore (raw) of a full + incremental chain",
            f"{med(ours):6.2f} s  {mib / med(ours):7.0f} MiB/s",
        )
        row(
            "qemu-img convert -O raw of the same served chain",
            f"{med(theirs):6.2f} s  {mib / med(theirs):7.0f} MiB/s",
        )
        row("ratio backupd restore/qemu-img throughput", f"{med(theirs) / med(ours):.2f}x")


def stage(started: float, what: str) -> None:
    """Say which case starts, and when (seconds since the benchmark started)."""
    print(f"[{time.perf_counter() - started:4.0f} s] {what}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where to put the disks (needs ~12 GiB of free space)",
    )
    parser.add_argument(
        "--cases",
        default="1,2,3,4,5,6,7,8,9,10",
        help="comma-separated case numbers to run (default: all)",
    )
    parser.add_argument(
        "--qmpbackup",
        type=Path,
        help="a qmpbackup source checkout with its own venv/ (case 10; skipped without)",
    )
    parser.add_argument("--request-size", help="backupd's request_size setting (e.g. 512K)")
    args = parser.parse_args()
    settings: dict[str, object] = {}
    if args.request_size:
        settings["request_size"] = args.request_size
    cases = {int(c) for c in args.cases.split(",")}
    root = Path(__file__).resolve().parent.parent
    peers = [args.qmpbackup] if args.qmpbackup is not None else []
    installed_like(root / "backupd", root / "nbdclient", *peers)
    work = Path(tempfile.mkdtemp(prefix="backupd-bench-", dir=args.dir))
    bench = Bench(work, args.rounds, settings)
    started = time.perf_counter()
    try:
        size = args.size_gib * GiB
        print(f"bench: preparing disks in {work}", flush=True)
        half = work / "half.qcow2"
        half_data = make_disk(half, size, [(o, MiB) for o in range(0, size, 2 * MiB)], 1)
        if cases & {1, 2}:
            stage(started, "case 1-2: full backups")
        if 1 in cases:
            full_time, full_copy, rss = await bench.full_case("50% in 1 MiB runs", half, half_data)
            full_rate = half_data / MiB / full_time
            full_copy_rate = half_data / MiB / full_copy
            row("peak RSS, 4 GiB disk full backup", f"{rss / 1024:.0f} MiB")
        if 2 in cases:
            scattered = work / "scattered.qcow2"
            rng = random.Random(2)
            chunks = sorted(rng.sample(range(size // 65536), size // 4 // 65536))
            scat_data = make_disk(scattered, size, [(c * 65536, 65536) for c in chunks], 2)
            await bench.full_case("25% in 64 KiB runs", scattered, scat_data)
        if 6 in cases:
            stage(started, "case 6: nbdclient copy")
            await bench.copy_case(half, half_data)
        if 3 in cases:
            stage(started, "case 3: incrementals")
            dirty_rate, dirty_copy_rate = await bench.incremental_case(half)
            if 1 in cases:
                row(
                    "ratio incremental dirty MiB/s / full MiB/s (target >= 0.5)",
                    f"{dirty_rate / full_rate:.2f}x",
                )
                row(
                    "the same ratio of the copy phases alone",
                    f"{dirty_copy_rate / full_copy_rate:.2f}x",
                )
        if 7 in cases:
            stage(started, "case 7: restore")
            await bench.restore_case(half, half_data)
        if 4 in cases:
            stage(started, "case 4: virtual size")
            await bench.sparse_case()
        if 5 in cases:
            stage(started, "case 5: parallel disks")
            await bench.parallel_case()
        if 8 in cases:
            stage(started, "case 8: an incremental at scale")
            await bench_peers.scale_case(bench)
        if 9 in cases:
            stage(started, "case 9: a merge")
            (work / "merge").mkdir()
            await bench_merge.bench(bench.rounds, work / "merge")
        if 10 in cases and args.qmpbackup is not None:
            stage(started, "case 10: beside qmpbackup")
            bench_peers.check_qmpbackup(args.qmpbackup)
            await bench_peers.qmpbackup_case(bench, half, half_data, args.qmpbackup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(bench.sockets, ignore_errors=True)
    print(
        f"\nbackupd benchmark ({os.cpu_count()} cores, {args.rounds} rounds, medians, "
        f"{time.perf_counter() - started:.0f} s in all)"
    )
    width = max(len(n) for n, _ in ROWS)
    for name, value in ROWS:
        print(f"| {name:<{width}} | {value:>24} |")


if __name__ == "__main__":
    asyncio.run(main())

"""The quick-start demo: a real qemu VM (no guest OS) with two disks, a full and an
incremental backup with backupd, both restored through the served image and compared
with what the guest wrote.  Everything lives in ./demo/ (removed at the start)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from integration.harness.vm import QemuVM

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def backupd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    print(f"\n$ backupd -c {config.relative_to(ROOT)} {' '.join(args)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "backupd", "-c", str(config), *args],
        text=True,
        stdout=subprocess.PIPE,
    )
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: backupd {args[0]} failed with exit code {result.returncode}")
    return result


async def main() -> None:
    demo = ROOT / "demo"
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="backupd-demo-", dir="/tmp"))
    vm = QemuVM(demo / "vm", {"vda": 256 * MiB, "vdb": 64 * MiB}, sockdir=sockets)
    vm.workdir.mkdir()
    config = demo / "backupd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": str(demo / "repository"),
                "scratch_dir": str(demo / "scratch"),
                "runtime_dir": str(sockets),
                "keep_last": 7,
                "vms": {"guest1": {"qmp": str(vm.qmp_path)}},
            }
        )
    )
    print("demo: starting VM guest1 (qemu, no guest OS) with disks vda 256 MiB, vdb 64 MiB")
    await vm.start()
    try:
        for i in range(24):
            await vm.write("vda", i * 8 * MiB, 2 * MiB, 0x10 + i)
        await vm.write("vdb", 0, 16 * MiB, 0xAB)
        first = vm.snapshot()
        backupd(config, "run", "--vm", "guest1")
        print("\ndemo: the guest writes 4 MiB more")
        for i in range(4):
            await vm.write("vda", (3 + i * 40) * MiB, MiB, 0xC0 + i)
        await vm.write("vdb", 32 * MiB, 64 * 1024, 0xCD)
        second = vm.snapshot()
        backupd(config, "run", "--vm", "guest1")
        backupd(config, "list", "--vm", "guest1")
        backupd(config, "verify", "--vm", "guest1", "--all")
        ids = sorted(
            p.name for p in (demo / "repository" / "guest1").iterdir() if p.name[0].isdigit()
        )
        for backup, expected in zip(ids, (first, second), strict=True):
            for disk in ("vda", "vdb"):
                out = demo / "restored" / f"{backup}-{disk}.raw"
                out.parent.mkdir(exist_ok=True)
                backupd(
                    config,
                    "restore",
                    "--vm",
                    "guest1",
                    "--backup",
                    backup,
                    "--disk",
                    disk,
                    "--output",
                    str(out),
                )
                if out.read_bytes() != expected[disk]:
                    raise SystemExit(f"demo: restored {backup}/{disk} differs from the guest!")
                print(f"demo: {backup}/{disk} restored byte-identical to what the guest had")
        backupd(config, "status", "--vm", "guest1")
    finally:
        await vm.quit()
        shutil.rmtree(sockets, ignore_errors=True)
    print(f"\ndemo: done. Repository: {demo / 'repository'}; configuration: {config}")


if __name__ == "__main__":
    asyncio.run(main())

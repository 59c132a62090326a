"""A full backup straight into object storage beside a plain upload of the same bytes.

    .venv/bin/python -m integration.bench_s3_backup [--rounds 3] [--data-gib 1]

Starts a private Swift (s3api; its proxy with ``--proxy-workers`` processes), a VM whose
one qcow2 disk holds ``--data-gib`` of random data, and then, round by round, in
alternating order:

- ``backupd run --full`` into ``s3://bench/...``: the disk read from qemu's NBD export,
  written as qcow2 with digests, streamed into a multipart upload (nothing staged on a
  local disk).  Its copy phase (``copy_seconds`` in the manifest: from connecting to the
  export to the completed upload) gives the throughput; the peak RSS is the whole
  process's;
- the reference: the very object that backup wrote (downloaded once, before timing)
  uploaded again from a local file with the same client library (aiobotocore, with
  backupd's client settings) at its best measured transfer settings
  (``integration/bench_s3``: 32 MiB parts, 4 in flight), in a process of its own.

Prints medians and the ratio (target: backup >= 0.9 x the plain upload), the peak RSS
of both, and Swift's.  The machine is shared and noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from integration.bench import backupd_cmd, make_disk, med
from integration.bench_common import measure
from integration.harness.vm import QemuVM

MiB = 1 << 20
GiB = 1 << 30
PART = 32 * MiB
IN_FLIGHT = 4
ENV = "BENCH_S3_TARGET"


async def _reference(paths: list[Path]) -> None:
    """Upload each of ``paths`` (in the child process), one after another."""
    from backupd.objectstore import ObjectStore, S3Settings

    target = json.loads(os.environ[ENV])
    settings = S3Settings(**target["settings"])
    async with ObjectStore(settings, target["bucket"]) as store:
        started = time.perf_counter()
        for path in paths:
            await _upload(store, path, f"plain/{path.name}")
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


async def _upload(store: Any, path: Path, key: str) -> None:
    """One file as ``key``: parts read with ``pread`` into buffers, IN_FLIGHT at a time."""
    fd = os.open(path, os.O_RDONLY)
    slots = asyncio.Semaphore(IN_FLIGHT)
    etags: dict[int, str] = {}
    upload = await store.create_multipart(key)

    async def part(number: int) -> None:
        async with slots:
            data = await asyncio.to_thread(os.pread, fd, PART, (number - 1) * PART)
            etags[number] = await store.upload_part(key, upload, number, data)

    try:
        async with asyncio.TaskGroup() as group:
            for number in range(1, -(-path.stat().st_size // PART) + 1):
                group.create_task(part(number))
        await store.complete_multipart(key, upload, etags)
    finally:
        os.close(fd)


def _reference_run(paths: list[Path], target: dict[str, object]) -> tuple[float, float, int]:
    cmd = [sys.executable, "-m", "integration.bench_s3_backup", "--reference", *map(str, paths)]
    _, cpu, rss, out = measure(cmd, {**os.environ, ENV: json.dumps(target)})
    return json.loads(out.splitlines()[-1])["seconds"], cpu, rss


async def _bucket_ops(target: dict[str, object], op: str, arg: str = "") -> object:
    from backupd.objectstore import ObjectStore, S3Settings

    settings = S3Settings(**target["settings"])  # type: ignore[arg-type]
    async with ObjectStore(settings, str(target["bucket"])) as store:
        if op == "create":
            await store.s3.create_bucket(Bucket=str(target["bucket"]))
        elif op == "clear":
            await store.delete_many([o.key async for o in store.list_objects(arg)])
        elif op == "get":
            return await store.get(arg)
        elif op == "manifest":
            keys = [o.key async for o in store.list_objects(arg) if o.key.endswith("manifest.json")]
            return json.loads(await store.get(keys[-1]))
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--disks", type=int, default=1, help="the data split over N disks")
    parser.add_argument("--proxy-workers", type=int, default=2)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--reference", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        await _reference([Path(p) for p in args.reference])
        return
    from integration.harness.s3server import SwiftS3Server

    size = int(args.data_gib * GiB) // MiB * MiB
    work = Path(tempfile.mkdtemp(prefix="backupd-bench-s3-", dir=args.workdir))
    sockets = Path(tempfile.mkdtemp(prefix="bkd-bs3-", dir="/tmp"))
    try:
        with SwiftS3Server(keep_logs=False, proxy_workers=args.proxy_workers) as server:
            target: dict[str, object] = {
                "bucket": "bench",
                "settings": {
                    "endpoint_url": server.endpoint_url,
                    "region": server.region,
                    "access_key_id": server.access_key_id,
                    "secret_access_key": server.secret_access_key,
                },
            }
            await _bucket_ops(target, "create")
            (work / "vm").mkdir()
            names = ["vda", *(f"vd{chr(ord('b') + i)}" for i in range(args.disks - 1))]
            each = size // len(names) // MiB * MiB
            data = sum(
                make_disk(work / "vm" / f"{name}.qcow2", each, [(0, each)], seed=3 + i)
                for i, name in enumerate(names)
            )
            vm = QemuVM(work / "vm", dict.fromkeys(names, each), sockdir=sockets)
            vm.model = {}
            config = work / "backupd.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "repository": "s3://bench/repo",
                        "s3": target["settings"],
                        "scratch_dir": str(work / "scratch"),
                        "runtime_dir": str(sockets),
                        "vms": {"guest1": {"qmp": str(vm.qmp_path)}},
                    }
                )
            )
            await vm.start()
            try:
                results = await _rounds(args.rounds, config, target, work, data)
            finally:
                await vm.kill()
            _report(results, data, args, server.rss_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


async def _rounds(
    rounds: int, config: Path, target: dict[str, object], work: Path, data: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    copies: list[Path] = []

    def note(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    for round_ in range(rounds):
        order = ["backup", "plain"] if round_ % 2 == 0 else ["plain", "backup"]
        for what in order:
            if what == "backup":
                await _bucket_ops(target, "clear", "repo/")
                took, cpu, rss, _ = measure(backupd_cmd(config, "run", "--vm", "guest1", "--full"))
                manifest = await _bucket_ops(target, "manifest", "repo/guest1/")
                assert isinstance(manifest, dict)
                note("backup wall", took)
                disks = manifest["disks"].values()
                note("backup copy", max(float(d["copy_seconds"]) for d in disks))
                note("backup rss", rss / 1024)
                note("backup cpu", cpu)
                for disk in [] if copies else sorted(manifest["disks"]):
                    # the objects the backup wrote, for the reference
                    key = f"repo/guest1/{manifest['id']}/{disk}.qcow2"
                    blob = await _bucket_ops(target, "get", key)
                    assert isinstance(blob, bytes)
                    copies.append(work / f"{disk}.qcow2")
                    copies[-1].write_bytes(blob)
            else:
                if not copies:
                    continue
                seconds, cpu, rss = _reference_run(copies, target)
                note("plain upload", seconds)
                note("plain rss", rss / 1024)
                note("plain cpu", cpu)
    return results


def _report(
    results: dict[str, list[float]], data: int, args: argparse.Namespace, swift_rss: int
) -> None:
    copy, plain = med(results["backup copy"]), med(results["plain upload"])
    print(
        f"\nfull backup of {data / GiB:.2f} GiB of data in {args.disks} disk(s) into Swift (s3api, "
        f"{args.proxy_workers} proxy workers, loopback, signed payloads over HTTP), "
        f"{args.rounds} rounds, medians, load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores:"
    )
    print(f"  {'what':<60} {'seconds':>8} {'MiB/s':>6} {'CPU s':>6} {'peak RSS':>9}")
    backup_cpu, plain_cpu = med(results["backup cpu"]), med(results["plain cpu"])
    rows = [
        ("backupd run --full, copy phase (NBD -> qcow2 -> S3)", copy, "", results["backup rss"]),
        (
            "backupd run --full, whole command",
            med(results["backup wall"]),
            f"{backup_cpu:6.1f}",
            results["backup rss"],
        ),
        (
            f"plain upload of the same objects ({PART // MiB} MiB parts, {IN_FLIGHT} in flight)",
            plain,
            f"{plain_cpu:6.1f}",
            results["plain rss"],
        ),
    ]
    for name, seconds, cpu, rss in rows:
        rate = data / MiB / seconds
        print(f"  {name:<60} {seconds:8.2f} {rate:6.0f} {cpu:>6} {max(rss):7.0f} M")
    print(f"  backup / plain upload: {plain / copy:.2f} x   (Swift's RSS: {swift_rss / MiB:.0f} M)")


if __name__ == "__main__":
    asyncio.run(main())

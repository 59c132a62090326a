"""Encrypted full backups beside unencrypted ones of the same disk, on real qemu.

    .venv/bin/python -m integration.bench_encryption [--rounds 3] [--size-gib 2]

One VM, one qcow2 disk with half of it random data in 1 MiB runs; ``backupd run --full``
into two repositories, one plain and one with ``encryption:``, alternating, several
rounds.  Prints medians of the whole run and of its copy phase (from the manifest),
data throughput, the ratio encrypted/plain, peak RSS of each, and what stock qemu pays
to open one encrypted file with the default KDF setting (``qemu-img check`` with the
key: it opens the image for I/O, which unlocks the LUKS key slot) beside the same file
unencrypted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from backupd.keys import DEFAULT_ITER_TIME, keygen
from integration.bench import Bench, MiB, backupd_cmd, copy_seconds, make_disk, timed


def _open_cost(image: Path, key: Path | None, rounds: int = 5) -> float:
    """Median seconds of ``qemu-img check`` opening ``image`` (with the key when given)."""
    args = ["qemu-img", "check", "-q", "-U", str(image)]
    if key is not None:
        opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"
        args = ["qemu-img", "check", "-q", "-U", "--object", f"secret,id=s0,file={key}",
                "--image-opts", opts]  # fmt: skip
    took = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        took.append(time.perf_counter() - started)
    return statistics.median(took)


async def main(rounds: int, size_gib: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bkd-bench-crypt-", dir="/var/tmp"))
    try:
        size = size_gib << 30
        runs = [(offset, MiB) for offset in range(0, size, 2 * MiB)]
        data = make_disk(work / "disk.qcow2", size, runs, seed=17)
        bench = Bench(work, rounds, {})
        vm = await bench.start_vm("vm", {"vda": work / "disk.qcow2"})
        key = work / "backupd.key"
        keygen(key)
        try:
            plain = bench.config(vm, "plain")
            secret = bench.config(vm, "secret")
            settings = yaml.safe_load(secret.read_text())
            settings["encryption"] = {"key_file": str(key)}
            secret.write_text(yaml.safe_dump(settings))
            results: dict[str, dict[str, list[float]]] = {
                name: {"wall": [], "copy": [], "rss": []} for name in ("plain", "secret")
            }
            for round_ in range(rounds):
                order = ("plain", "secret") if round_ % 2 == 0 else ("secret", "plain")
                for name in order:
                    config = plain if name == "plain" else secret
                    took, peak = await asyncio.to_thread(
                        timed, backupd_cmd(config, "run", "--vm", "guest1", "--full")
                    )
                    results[name]["wall"].append(took)
                    results[name]["copy"].append(copy_seconds(work / f"repo-{name}"))
                    results[name]["rss"].append(peak / 1024)
            _report(results, data, rounds)
            newest = sorted((work / "repo-secret" / "guest1").glob("*/vda.qcow2"))[-1]
            plain_file = sorted((work / "repo-plain" / "guest1").glob("*/vda.qcow2"))[-1]
            print(
                f"| open one file, qemu-img check (default iter_time {DEFAULT_ITER_TIME} s) | "
                f"{_open_cost(newest, key):.3f} s encrypted | "
                f"{_open_cost(plain_file, None):.3f} s plain |"
            )
        finally:
            await vm.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(results: dict[str, dict[str, list[float]]], data: int, rounds: int) -> None:
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    mib = data / MiB
    print(f"\nencrypted vs plain full backup, {mib:.0f} MiB of data, {rounds} rounds, medians")
    print("| | plain | encrypted | ratio (throughput) |")
    print("|---|---|---|---|")
    for what, label in (("wall", "backupd run --full"), ("copy", "copy phase (manifest)")):
        p, s = med["plain"][what], med["secret"][what]
        print(
            f"| {label} | {p:.2f} s, {mib / p:.0f} MiB/s | {s:.2f} s, {mib / s:.0f} MiB/s "
            f"| {p / s:.2f}x |"
        )
    print(f"| peak RSS | {med['plain']['rss']:.0f} MiB | {med['secret']['rss']:.0f} MiB | |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.size_gib))

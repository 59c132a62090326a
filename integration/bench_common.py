"""What the benchmark scripts share: the table of results, timing a command (with its
peak RSS), making disks with data where wanted, the backupd command line."""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"  {name:<62} {value}", flush=True)


def make_disk(path: Path, size: int, runs: list[tuple[int, int]], seed: int) -> int:
    """A qcow2 of ``size`` holding random data in ``runs`` (offset, length)."""
    raw = path.with_suffix(".raw")
    rng = random.Random(seed)
    block = rng.randbytes(8 * MiB)
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, length in runs:
            f.seek(offset)
            done = 0
            while done < length:
                n = min(length - done, len(block))
                start = rng.randrange(0, len(block) - n + 1)
                f.write(block[start : start + n])
                done += n
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()
    return sum(n for _, n in runs)


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, str]:
    """Wall time, CPU seconds (user + system), peak RSS (KiB) and output of a command."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "CPU=%U+%S RSS=%M", *cmd], capture_output=True, text=True, env=env
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    found = re.findall(r"CPU=([\d.]+)\+([\d.]+) RSS=(\d+)", proc.stderr)
    if not found:
        return took, 0.0, 0, proc.stdout
    user, system, rss = found[-1]
    return took, float(user) + float(system), int(rss), proc.stdout


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of a command."""
    took, _, rss, _ = measure(cmd, env)
    return took, rss


def backupd_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "backupd", "-q", "-c", str(config), *args]


def copy_seconds(repo: Path) -> float:
    """The copy phase of the newest backup in ``repo`` (its slowest disk), from the
    manifest: connecting to the export until the backup file is synced."""
    newest = max(repo.glob("*/*/manifest.json"), key=lambda p: p.parent.name)
    disks = json.loads(newest.read_text())["disks"].values()
    return max(float(d["copy_seconds"]) for d in disks)


def med(values: list[float]) -> float:
    return statistics.median(values)


def installed_like(*trees: Path) -> None:
    """Run the programs as an installation runs them: with their bytecode compiled (pip
    compiles it at install time; an environment with PYTHONDONTWRITEBYTECODE would have
    every run compile every module again, for backupd and the peers alike)."""
    import os

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for tree in trees:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(tree)],
            check=True,
            stdout=subprocess.DEVNULL,
        )

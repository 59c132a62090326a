"""What a restored disk of the Linux test guest holds: is its ext4 clean (``e2fsck``),
does its journal still need replaying (the superblock's ``needs_recovery``), and are the
workload's records an exact numbered prefix.  Everything reads the image file with the
host's e2fsprogs (no mount, no root, no loop device).

The guest's workload (scripts/guest/workload) appends 64-byte records ``record 00000042``
(space-padded, newline-terminated) to ``/records`` on the disk, each fsync'd before the
next: any point in time of that disk holds records 0..N-1 and nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

RECORDS_PATH = "/records"
RECORD_SIZE = 64
E2FSPROGS = "/usr/sbin:/sbin"  # by path: a busybox on PATH has its own mke2fs


def record(number: int) -> bytes:
    """The bytes of record NUMBER as the workload writes them."""
    return f"record {number:08d}".ljust(RECORD_SIZE - 1).encode() + b"\n"


def e2fsprog(name: str) -> str:
    path = shutil.which(name, path=E2FSPROGS)
    if path is None:
        raise RuntimeError(f"{name} not found in {E2FSPROGS} (Debian: e2fsprogs)")
    return path


def make_ext4(image: Path, size: int) -> None:
    """A raw image of SIZE bytes holding an empty ext4 (inode tables and journal
    written now, so the guest's kernel has no lazy initialisation left to do)."""
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(
        [
            e2fsprog("mke2fs"),
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(image),
        ],
        check=True,
    )


def needs_recovery(image: Path) -> bool:
    """Whether the journal holds transactions not yet written to their place."""
    out = subprocess.run(
        [e2fsprog("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("Filesystem features:"):
            return "needs_recovery" in line.split(":", 1)[1].split()
    raise AssertionError(f"dumpe2fs -h {image} printed no feature line:\n{out}")


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    """``e2fsck -fn``: a forced read-only check (exit 0 = clean).  It does not replay the
    journal: on an image that needs recovery it checks the unreplayed state."""
    return subprocess.run([e2fsprog("e2fsck"), "-fn", str(image)], capture_output=True, text=True)


# What the kernel does not journal: the superblock's free counts (it recounts them
# at mount), so e2fsck finds them wrong after any crash.  Any other repair is damage.
_CRASH_NORMAL = re.compile(r"Free (blocks|inodes) count wrong \(\d+, counted=\d+\)\.")


def replay_journal(image: Path, copy: Path) -> Path:
    """A sparse COPY of IMAGE with its journal replayed (``e2fsck -fy``), as a mount
    after a crash would do.  IMAGE is not changed.  Asserts that e2fsck repaired
    nothing but what a crash of a sound ext4 leaves (the superblock's free counts)."""
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    result = subprocess.run([e2fsprog("e2fsck"), "-fy", str(copy)], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    repairs = [lines[i - 1] for i, line in enumerate(lines) if i and line.endswith("? yes")]
    damage = [r for r in repairs if not _CRASH_NORMAL.fullmatch(r)]
    # exit 0: clean; 1: the file system was changed (the journal replay alone does that)
    assert result.returncode in (0, 1) and not damage, (
        f"e2fsck -fy {copy}: exit {result.returncode}, repaired {damage}\n{result.stdout}"
    )
    return copy


def read_file(image: Path, path: str = RECORDS_PATH) -> bytes:
    """The contents of PATH in the ext4 IMAGE (``debugfs -R 'cat PATH'``)."""
    result = subprocess.run(
        [e2fsprog("debugfs"), "-R", f"cat {path}", str(image)], capture_output=True
    )
    errors = [
        line
        for line in result.stderr.decode(errors="replace").splitlines()
        if not line.startswith("debugfs ")  # the version banner
    ]
    if any("File not found" in line for line in errors):
        raise FileNotFoundError(f"{path} in {image}")
    if result.returncode != 0 or errors:
        raise AssertionError(f"debugfs cat {path} in {image}: {errors or result.returncode}")
    return result.stdout


def count_records(data: bytes) -> int:
    """N when DATA is exactly records 0..N-1; otherwise an AssertionError that says
    where the first wrong record is (a gap, a torn record, a partial tail)."""
    whole, tail = divmod(len(data), RECORD_SIZE)
    for number in range(whole):
        got = data[number * RECORD_SIZE : (number + 1) * RECORD_SIZE]
        if got != record(number):
            raise AssertionError(f"record {number} (of {whole}) is {got!r}")
    if tail:
        raise AssertionError(f"{tail} bytes of a torn record after record {whole - 1}")
    return whole


@dataclass(frozen=True)
class Ext4Point:
    """One point in time of the guest's disk, as a raw image."""

    needs_recovery: bool
    records: int


def check_quiesced(image: Path) -> Ext4Point:
    """A point taken with the guest's file systems frozen: clean as it is, no journal
    to replay, records an exact prefix."""
    assert not needs_recovery(image), f"{image}: the journal needs recovery (not frozen)"
    result = fsck(image)
    assert result.returncode == 0, f"e2fsck -fn {image}: {result.returncode}\n{result.stdout}"
    return Ext4Point(needs_recovery=False, records=count_records(read_file(image)))


def check_crash_consistent(image: Path, copy: Path) -> Ext4Point:
    """A point taken without freezing: what a crash at that instant leaves.  Clean once
    the journal is replayed (on COPY), with records an exact prefix."""
    pending = needs_recovery(image)
    replayed = replay_journal(image, copy)
    assert not needs_recovery(replayed)
    result = fsck(replayed)
    assert result.returncode == 0, f"e2fsck -fn {copy}: {result.returncode}\n{result.stdout}"
    return Ext4Point(needs_recovery=pending, records=count_records(read_file(replayed)))

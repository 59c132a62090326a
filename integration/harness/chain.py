"""Disk images for tests, made and checked with qemu's own tools (qemu-img, qemu-io), and
reading a point of a backup chain back to compare it with the model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands (``write -P 0xab 1M 2M``, ...) on an image not in use."""
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def make_qcow2(path: Path, size: int | str, *writes: str) -> Path:
    """A new qcow2 of ``size`` (bytes, or like ``32M``), with qemu-io ``writes`` done."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if writes:
        qemu_io(path, *writes)
    return path


def qemu_img_compare(
    a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2"
) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare``: exit 0 when the guest-visible contents are equal."""
    return subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )


def qemu_img_check(path: Path) -> None:
    out = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, f"qemu-img check {path}: {out.stdout}{out.stderr}"


def read_image(path: Path, tmp: Path) -> bytes:
    """The guest bytes of ``path`` (through its backing chain)."""
    raw = tmp / f"read-{path.parent.name}-{path.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` (without taking its lock), as JSON."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def backing_of(path: Path) -> str | None:
    backing: str | None = image_info(path).get("backing-filename")
    return backing


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def backups(repo: Path, vm: str = "guest1") -> list[Path]:
    """The committed backup folders of ``vm``, oldest first."""
    folder = repo / vm
    return sorted(p for p in folder.iterdir() if p.name[0].isdigit()) if folder.is_dir() else []


def checkpoint_bitmap(backup: Path) -> str:
    """The name of the qemu bitmap of a backup folder (``<repo>/<vm>/<id>``)."""
    identity = (backup.parent.parent / ".repository-id").read_text().strip()
    return f"backupd-{identity}-{backup.name}"

"""Checks of a backup chain against the model: read a point in time back with qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


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


def backing_of(path: Path) -> str | None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    backing: str | None = info.get("backing-filename")
    return backing


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))

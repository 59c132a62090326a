"""A VM's images while its qemu is not running: their bitmaps as the file holds them,
whether a process still holds them locked, and the configuration of ``images:``."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from integration.harness.chain import image_info
from integration.harness.vm import QemuVM


def image_bitmaps(path: Path) -> dict[str, list[str]]:
    """Bitmap name -> flags ("auto": recording, "in-use": left by a qemu that did not
    close the image) as the qcow2 file holds them."""
    data = image_info(path).get("format-specific", {}).get("data", {})
    return {b["name"]: list(b.get("flags", [])) for b in data.get("bitmaps", [])}


def wait_until_free(path: Path, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """``qemu-img check`` *without* ``-U`` once no process holds the image locked (it
    takes the lock itself); the result of the first check that got the lock."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
        if "lock" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def images_of(vm: QemuVM) -> dict[str, str]:
    """The ``images:`` entry of a test VM."""
    return {name: str(path) for name, path in vm.images.items()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

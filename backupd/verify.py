"""verify: prove a backup without the VM.

Structure: the manifest parses, the chain links exist, every file passes
``qemu-img check`` and names exactly its parent as backing file.  Content: every digest
recorded at backup time is recomputed from the stored bytes, so a single flipped byte
in any data cluster is found and reported with backup id, disk and guest offset.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field

import aiofiles

from backupd.digests import hexdigest
from backupd.errors import BackupdError, NotFoundError
from backupd.manifest import Manifest
from backupd.repository import VMRepository
from backupd.serving import chain_files


@dataclass
class Report:
    backup: str
    problems: list[str] = field(default_factory=list)
    digests: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def _qemu_img_check(path: str) -> str | None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "check",
        "-U",
        "--output=json",
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode == 0:
        return None
    try:
        info = json.loads(out)
        parts = [f"{k}={info[k]}" for k in ("corruptions", "leaks", "check-errors") if info.get(k)]
        return "qemu-img check: " + (", ".join(parts) or f"exit {proc.returncode}")
    except ValueError:
        lines = err.decode(errors="replace").strip().splitlines()
        return "qemu-img check: " + (lines[-1] if lines else f"exit {proc.returncode}")


async def _check_digests(path: str, manifest: Manifest, disk: str, report: Report) -> None:
    """Re-hash every stored run (reads through aiofiles, hashing in a thread)."""
    record = manifest.disks[disk]
    size = os.path.getsize(path)
    async with aiofiles.open(path, "rb") as f:
        for run in record.digests:
            if run.host_offset + run.length > size:
                report.problems.append(
                    f"backup {manifest.id} disk {disk}: data at guest offset {run.guest_offset} "
                    f"is missing (file truncated to {size} bytes)"
                )
                return
            await f.seek(run.host_offset)
            data = await f.read(run.length)
            report.digests += 1
            report.bytes += len(data)
            digest = await asyncio.to_thread(hexdigest, data, record.digest_algorithm)
            if digest != run.digest:
                report.problems.append(
                    f"backup {manifest.id} disk {disk}: stored data at guest offset "
                    f"{run.guest_offset} (+{run.length} bytes) does not match its digest"
                )


async def verify_backup(repo: VMRepository, backup: str) -> Report:
    report = Report(backup)
    try:
        manifest = repo.load(backup)
    except NotFoundError:
        raise
    except BackupdError as exc:
        report.problems.append(str(exc))
        return report
    for disk in sorted(manifest.disks):
        try:
            files = chain_files(repo, manifest, disk)
        except BackupdError as exc:
            report.problems.append(str(exc))
            continue
        own = str(files[-1])
        problem = await _qemu_img_check(own)
        if problem is not None:
            report.problems.append(f"backup {backup} disk {disk}: {problem}")
        await _check_digests(own, manifest, disk, report)
    return report

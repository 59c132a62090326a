"""verify: prove a backup without the VM.

Structure: the manifest parses, the chain links exist, every file of the chain passes
the gate (:mod:`backupd.chain`: an image backupd could have written, naming exactly its
parent) and ``qemu-img check`` (on the checked file itself, without its backing chain).
Content: every digest recorded at backup time is recomputed from the stored bytes, so a
single flipped byte in any data cluster is found and reported with backup id, disk and
guest offset.  A run that lies past the end of the file is reported as missing data.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from backupd.chain import CheckedFile, checked_chain
from backupd.digests import hasher
from backupd.errors import BackupdError, NotFoundError
from backupd.manifest import Manifest
from backupd.storage.images import ImageFile
from backupd.storage.vmrepo import VMRepo

#: digests are computed over pieces of at most this size (a run's length is untrusted)
PIECE = 4 << 20


@dataclass
class Report:
    backup: str
    problems: list[str] = field(default_factory=list)
    digests: int = 0
    bytes: int = 0
    #: the backups this one needs, oldest first (known when its chain could be walked)
    needs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _image_opts(image: ImageFile) -> str:
    """The checked file as qemu sees it: by descriptor (or the pinned object), with no
    backing file (the chain was checked by the gate; qemu-img check needs only this
    file's metadata)."""
    spec = {"driver": "qcow2", "backing": None, "file": image.qemu_file()}
    return "json:" + json.dumps(spec)


async def _qemu_img_check(checked: CheckedFile) -> str | None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "check",
        "-U",
        "--output=json",
        _image_opts(checked.image),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        pass_fds=checked.image.pass_fds,
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


async def _check_digests(
    checked: CheckedFile, manifest: Manifest, disk: str, report: Report
) -> None:
    """Re-hash every stored run (reads off the event loop, hashing in a thread)."""
    record = manifest.disks[disk]
    size = checked.facts.file_size
    for run in record.digests:
        if run.host_offset + run.length > size:
            report.problems.append(
                f"backup {manifest.id} disk {disk}: data at guest offset {run.guest_offset} "
                f"is missing (file truncated to {size} bytes)"
            )
            return
        digest = hasher(record.digest_algorithm)
        left = run.length
        while left:
            piece = await checked.image.read(run.host_offset + run.length - left, min(left, PIECE))
            if not piece:
                break
            await asyncio.to_thread(digest.update, piece)
            left -= len(piece)
            report.bytes += len(piece)
        report.digests += 1
        if left or digest.hexdigest() != run.digest:
            report.problems.append(
                f"backup {manifest.id} disk {disk}: stored data at guest offset "
                f"{run.guest_offset} (+{run.length} bytes) does not match its digest"
            )


async def verify_backup(repo: VMRepo, backup: str) -> Report:
    report = Report(backup)
    try:
        manifest = repo.load(backup)
        report.needs = [m.id for m in repo.chain(backup)[:-1]]
    except NotFoundError:
        raise
    except BackupdError as exc:
        report.problems.append(str(exc))
        return report
    for disk in sorted(manifest.disks):
        try:
            with checked_chain(repo, manifest, disk) as files:
                problem = await _qemu_img_check(files[-1])
                if problem is not None:
                    report.problems.append(f"backup {backup} disk {disk}: {problem}")
                await _check_digests(files[-1], manifest, disk, report)
        except BackupdError as exc:
            report.problems.append(str(exc))
    return report

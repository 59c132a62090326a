"""verify: prove a backup without the VM.

Structure: the manifest parses, the chain links exist, every file of the chain passes
the gate (:mod:`backupd.chain`: an image backupd could have written, naming exactly its
parent) and ``qemu-img check`` (on the checked file itself, without its backing chain).
Content: every digest recorded at backup time is recomputed from the stored bytes, so a
single flipped byte in any data cluster is found and reported with backup id, disk and
guest offset.  A run that lies past the end of the file is reported as missing data.

Encrypted backups need the VM's key: each file is unlocked with it (a key that opens
no key slot is exit 2, not damage), ``qemu-img check`` gets it as a secret, and every
run is decrypted and its keyed digest of the plaintext recomputed, so a flipped byte of
ciphertext is found like any other.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backupd.chain import CheckedFile, checked_chain
from backupd.digests import hasher
from backupd.errors import BackupdError, EncryptionKeyError, NotFoundError
from backupd.keys import SECRET_ID, Key
from backupd.manifest import Manifest
from backupd.storage.images import ImageFile
from backupd.storage.vmrepo import VMRepo

if TYPE_CHECKING:
    from backupd.qcow2.encryption import ImageKey

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


def _image_opts(image: ImageFile, encrypted: bool) -> str:
    """The checked file as qemu sees it: by descriptor (or the pinned object), with no
    backing file (the chain was checked by the gate; qemu-img check needs only this
    file's metadata)."""
    spec: dict[str, object] = {"driver": "qcow2", "backing": None, "file": image.qemu_file()}
    if encrypted:
        spec["encrypt"] = {"format": "luks", "key-secret": SECRET_ID}
    return "json:" + json.dumps(spec)


async def _qemu_img_check(checked: CheckedFile, key: Key | None) -> str | None:
    encrypted = checked.facts.encrypted and key is not None
    secret = ["--object", key.qemu_object_arg(SECRET_ID)] if encrypted and key else []
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "check",
        *secret,
        "-U",
        "--output=json",
        _image_opts(checked.image, encrypted),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        pass_fds=checked.image.pass_fds + ((key.fd,) if encrypted and key else ()),
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


def _plaintext(image_key: ImageKey | None, piece: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes of ``piece`` (read at ``offset``), decrypted when encrypted."""
    if image_key is None:
        return piece[:length]
    return image_key.plaintext(piece, offset, length)


async def _check_digests(
    checked: CheckedFile,
    manifest: Manifest,
    disk: str,
    report: Report,
    image_key: ImageKey | None = None,
) -> None:
    """Re-hash every stored run (reads off the event loop, decrypting and hashing in a
    thread)."""
    record = manifest.disks[disk]
    size = checked.facts.file_size
    digest_key = image_key.digest_key if image_key is not None else None
    for run in record.digests:
        if run.host_offset + run.length > size:
            report.problems.append(
                f"backup {manifest.id} disk {disk}: data at guest offset {run.guest_offset} "
                f"is missing (file truncated to {size} bytes)"
            )
            return
        digest = hasher(record.digest_algorithm, digest_key)
        left = run.length
        while left:
            # encrypted: whole sectors (the cluster holding a run's end is the file's)
            want = min(left, PIECE)
            offset = run.host_offset + run.length - left
            piece = await checked.image.read(
                offset, want if image_key is None else -(-want // 512) * 512
            )
            if not piece:
                break
            data = await asyncio.to_thread(_plaintext, image_key, piece, offset, want)
            await asyncio.to_thread(digest.update, data)
            left -= len(data)
            report.bytes += len(data)
        report.digests += 1
        if left or digest.hexdigest() != run.digest:
            report.problems.append(
                f"backup {manifest.id} disk {disk}: stored data at guest offset "
                f"{run.guest_offset} (+{run.length} bytes) does not match its digest"
            )


async def _unlock(checked: CheckedFile, key: Key | None, where: str) -> ImageKey | None:
    """The key of an encrypted file (EncryptionKeyError when the key does not open it)."""
    if not checked.facts.encrypted or key is None:
        return None
    return await asyncio.to_thread(key.open_image, checked.image.inspectable, where)


async def verify_backup(repo: VMRepo, backup: str, key: Key | None = None) -> Report:
    """Verify one backup (``key``: the VM's encryption key, when it is encrypted)."""
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
            with checked_chain(repo, manifest, disk, encrypted=key is not None) as files:
                where = f"backup {backup} of vm {repo.vm}, disk {disk}"
                image_key = await _unlock(files[-1], key, where)
                problem = await _qemu_img_check(files[-1], key)
                if problem is not None:
                    report.problems.append(f"backup {backup} disk {disk}: {problem}")
                await _check_digests(files[-1], manifest, disk, report, image_key)
        except EncryptionKeyError:
            raise  # not damage: the wrong key (exit 2)
        except BackupdError as exc:
            report.problems.append(str(exc))
    return report

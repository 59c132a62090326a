"""``backupd rekey``: a new key for every encrypted file of a VM, without re-encrypting
a byte of data.

Each file keeps its master key; only the LUKS key slots change, with qemu's own tool:
``qemu-img amend`` adds a slot for the new key (``encrypt.state=active``,
``encrypt.new-secret``), then removes every slot of the old one (``encrypt.state=
inactive``, ``encrypt.old-secret``).  Digests are keyed with a key derived from the
master key, so every manifest stays valid.  Files are done one at a time, and each is
looked at first (which keys open it), so a rekey that was interrupted is simply run
again: a file the new key already opens is finished or skipped.  Holds the VM's lock
and its readers' lock exclusively (no run, serve, restore or prune meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass

from backupd.chain import check_image, image_name
from backupd.errors import ChainError, EncryptionKeyError
from backupd.keys import Key
from backupd.manifest import Manifest
from backupd.merge.fold import canonical_header
from backupd.qemu.tools import qemu_img
from backupd.repository import VMRepository

log = logging.getLogger("backupd.rekey")


@dataclass
class RekeyReport:
    changed: int = 0
    already: int = 0
    plain: int = 0


def _spec(fd: int) -> str:
    spec = {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": f"/dev/fd/{fd}"},
        "encrypt": {"format": "luks", "key-secret": "opener"},
    }
    return "json:" + json.dumps(spec)


async def _amend(fd: int, opener: Key, other: Key, options: str) -> None:
    """``qemu-img amend`` of the file open on ``fd``, opened with ``opener``; ``other``
    is the secret ``other`` of ``options``."""
    await qemu_img(
        "amend", "--object", opener.qemu_object_arg("opener"),
        "--object", other.qemu_object_arg("other"), "-o", options, _spec(fd),
        pass_fds=(fd, opener.fd, other.fd),
    )  # fmt: skip


async def _opens(fd: int, key: Key) -> bool:
    from backupd.qcow2.encryption import WrongKey, unlock_file

    try:
        await asyncio.to_thread(unlock_file, fd, key.passphrase, "")
    except WrongKey:
        return False
    return True


async def _rekey_file(
    repo: VMRepository, manifest: Manifest, disk: str, old: Key, new: Key
) -> bool:
    """The file of ``disk`` in ``manifest``'s backup opened by ``new`` only; True when it
    was changed (False: it already was)."""
    parent = repo.load(manifest.parent) if manifest.parent else None
    checked = check_image(repo, manifest, disk, parent, allow_encryption=True)
    where = f"backup {manifest.id} of vm {repo.vm}, disk {disk}"
    try:
        fd = os.open(f"/proc/self/fd/{checked.fd}", os.O_RDWR | os.O_CLOEXEC)
    finally:
        checked.image.close()
    try:
        old_opens, new_opens = await _opens(fd, old), await _opens(fd, new)
        if not old_opens and not new_opens:
            raise EncryptionKeyError(f"neither the old nor the new key opens {where}")
        if not old_opens:
            return False
        iter_ms = max(1, round(new.settings.iter_time * 1000))
        if not new_opens:
            add = f"encrypt.state=active,encrypt.new-secret=other,encrypt.iter-time={iter_ms}"
            await _amend(fd, old, new, add)
        await _amend(fd, new, old, "encrypt.state=inactive,encrypt.old-secret=other")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:  # qemu may have rewritten the header in its own form
        check_image(repo, manifest, disk, parent, allow_encryption=True).image.close()
    except ChainError:
        canonical_header(repo, manifest.id, disk)
    return True


async def rekey_vm(repo: VMRepository, old: Key, new: Key, purpose: str) -> RekeyReport:
    """Every encrypted file of the VM opened by ``new`` instead of ``old``."""
    report = RekeyReport()
    with repo.lock(purpose=purpose), repo.readers(exclusive=True, purpose=purpose):
        repo.refuse_unfinished_merge()
        for manifest in repo.backups():
            for disk in sorted(manifest.disks):
                if not manifest.disks[disk].encrypted:
                    report.plain += 1
                elif await _rekey_file(repo, manifest, disk, old, new):
                    report.changed += 1
                    log.info("%s: %s/%s now opens with the new key", repo.vm, manifest.id,
                             image_name(disk))  # fmt: skip
                else:
                    report.already += 1
    return report

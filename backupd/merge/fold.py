"""One fold, disk by disk, with qemu's own tools, and the exchange that ends it.

Why every kept point stays readable, byte-identical, at every instant (the argument the
fault tests check):

- *Down* (folded F, B1..Bk-1 into the kept Bk): ``qemu-img commit -d -b F Bk`` writes into
  F's file the newest version of every cluster B1..Bk hold.  Bk's point (and every point
  above it) reads each such cluster from B1..Bk, never from F, so nothing it reads
  changes; only F..Bk-1's own points are destroyed, and the journal hid them before the
  first write.  F's file then *is* Bk's point, and F's unfolded clusters are exactly what
  Bk's chain read from F.  The exchange renames F's file over Bk's (atomic per disk) and
  then Bk's new manifest over its old one; a kill in between is finished from the journal
  (state SWAP) before anything reads Bk again.
- *Up* (folded Ka+1..Kb-1 between the kept Ka and Kb): ``qemu-img rebase -b Ka Kb`` copies
  into Kb's file every cluster Kb does not hold whose content differs between its old
  chain and Ka: what Kb reads stays what it read.  The last step of the rebase writes
  the new backing name into Kb's header; from then on Kb's file names Ka while its old
  manifest still names Kb-1, which the gate refuses (never wrong data) until the new
  manifest is in place.

Both are idempotent: an interrupted fold is simply done again.  While a merge is
unfinished, commands that read backups refuse with one line that says how to finish it.
Before qemu opens a repository file, the gate (:mod:`backupd.chain`) checks the chain;
afterwards the header is rewritten in backupd's own form (qemu adds a feature-name
extension on rebase) and leaked clusters of an interrupted qemu-img are reclaimed
(``qemu-img check -r leaks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backupd.chain import CheckedFile, check_image, checked_chain, image_name
from backupd.errors import EncryptionKeyError, RepositoryError
from backupd.faults import checkpoint
from backupd.keys import Key
from backupd.manifest import DiskRecord, Kind, Manifest, check_digests
from backupd.merge import opening, records
from backupd.merge.plan import Direction, Fold
from backupd.qcow2 import layout
from backupd.qcow2.inspector import ImageReader, ImageRefused, inspect_image
from backupd.qemu.tools import qemu_img
from backupd.repository import MANIFEST, VMRepository
from backupd.storage.vmrepo import VMRepo

if TYPE_CHECKING:
    from backupd.qcow2.encryption import ImageKey

log = logging.getLogger("backupd.merge")

NEW_MANIFEST = MANIFEST + ".new"


@dataclass(frozen=True, slots=True)
class FoldResult:
    manifest: Manifest
    #: guest bytes the folded backups held (what was merged)
    merged: int
    seconds: float


def _backing(repo: VMRepository, backup: str, disk: str, key: Key | None) -> str | None:
    fd = repo.open_file(backup, image_name(disk))
    try:
        return inspect_image(fd, allow_encryption=key is not None).backing_file
    except ImageRefused:
        return _raw_backing(fd)  # qemu's header form, before it is rewritten
    finally:
        os.close(fd)


def _raw_backing(fd: int) -> str | None:
    head = os.pread(fd, layout.HEADER_LENGTH, 0)
    offset, length = struct.unpack_from(">QI", head, 8)
    return os.pread(fd, length, offset).decode() if offset else None


def canonical_header(
    repo: VMRepository, backup: str, disk: str, backing_name: str | None = None
) -> None:
    """Rewrite a file's header in backupd's own form (the fields qemu left, the backing
    format extension, the encryption extension, the backing name -- ``backing_name``
    instead of the one in the file when given; nothing else), in place and durably.
    The whole new header lies in the first sector, so even a torn write leaves a valid
    image."""
    folder = repo.folder(backup)
    try:
        fd = os.open(image_name(disk), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    finally:
        os.close(folder)
    try:
        head = os.pread(fd, layout.HEADER_LENGTH, 0)
        fields = layout.HEADER.unpack(head)
        cluster_bits = int(fields[4])
        backing = backing_name or _raw_backing(fd)
        old = os.pread(fd, 1 << cluster_bits, 0)
        header = layout.encode_header(
            cluster_bits=cluster_bits,
            size=int(fields[5]),
            l1_size=int(fields[7]),
            l1_offset=int(fields[8]),
            refcount_table_offset=int(fields[9]),
            refcount_table_clusters=int(fields[10]),
            backing_file=backing,
            backing_format="qcow2" if backing else None,
            encryption=layout.fde_extension(old) if fields[6] == layout.CRYPT_LUKS else None,
        )
        if old.startswith(header) and not old[len(header) :].strip(b"\0"):
            return  # already ours
        used = len(old.rstrip(b"\0"))
        os.pwrite(fd, header + bytes(max(0, used - len(header))), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _after_qemu(
    repo: VMRepository,
    backup: str,
    disk: str,
    resumed: bool,
    key: Key | None = None,
    backing: tuple[str, int] | None = None,
) -> None:
    """What qemu-img leaves to tidy: a header of qemu's form, and (after a qemu-img that a
    kill interrupted, which only a resumed merge can meet) leaked clusters.  ``backing``:
    the file's backing name and the files below it (an encrypted rebase left a
    ``json:`` name in the header)."""
    if resumed:
        path = f"{backup}/{image_name(disk)}"
        below = backing[1] if backing else 0
        await qemu_img(
            "check", "-q", "-r", "leaks", *opening.secret_args(key),
            *opening.image_args(path, below, key), cwd=repo.path, pass_fds=opening.fds(key),
        )  # fmt: skip
    canonical_header(repo, backup, disk, backing[0] if backing else None)


async def _commit(repo: VMRepository, files: list[CheckedFile], disk: str, key: Key | None) -> None:
    """Every file above the chain's full (``files``) committed into it: in one
    ``commit -b`` when plain, one level at a time (top down) when encrypted."""
    top = f"{files[-1].backup}/{image_name(disk)}"
    if key is None:
        base = f"../{files[0].backup}/{image_name(disk)}"
        await qemu_img("commit", "-q", "-f", "qcow2", "-d", "-b", base, top, cwd=repo.path)
        return
    for below in range(len(files) - 1, 0, -1):  # each into its own backing file
        path = f"{files[below].backup}/{image_name(disk)}"
        await qemu_img(
            "commit", "-q", "-d", *opening.secret_args(key),
            *opening.image_args(path, below, key), cwd=repo.path, pass_fds=opening.fds(key),
        )  # fmt: skip


async def _rebase(
    repo: VMRepository,
    files: list[CheckedFile],
    lower: list[CheckedFile],
    disk: str,
    key: Key | None,
) -> None:
    """The target (top of ``files``) rebased onto the top of ``lower``."""
    target = f"{files[-1].backup}/{image_name(disk)}"
    if key is None:
        new_backing = f"../{lower[-1].backup}/{image_name(disk)}"
        await qemu_img(
            "rebase", "-q", "-f", "qcow2", "-b", new_backing, "-F", "qcow2", target, cwd=repo.path
        )
        return
    spec = opening.backing_spec(f"{lower[-1].backup}/{image_name(disk)}", len(lower) - 1)
    await qemu_img(
        "rebase", "-q", *opening.secret_args(key), "-b", spec, "-F", "qcow2",
        *opening.image_args(target, len(files) - 1, key), cwd=repo.path, pass_fds=opening.fds(key),
    )  # fmt: skip


def _file_key(fd: int | ImageReader, key: Key | None, where: str) -> ImageKey | None:
    """The master key of an encrypted file the fold changed (its new digests)."""
    if key is None:
        return None
    from backupd.qcow2.encryption import unlock_file

    return unlock_file(fd, key.passphrase, where)


def _write_new_manifest(repo: VMRepository, manifest: Manifest) -> None:
    folder = repo.folder(manifest.id)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(NEW_MANIFEST, dir_fd=folder)
        fd = os.open(
            NEW_MANIFEST,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=folder,
        )
        try:
            os.write(fd, manifest.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(folder)
    finally:
        os.close(folder)


def _stamp(reason: str, fold: Fold) -> str:
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    what = fold.folded[0] if len(fold.folded) == 1 else f"{fold.folded[0]}..{fold.folded[-1]}"
    return f"{reason}; {what} merged in on {day}"


async def fold_down(
    repo: VMRepository, fold: Fold, resumed: bool = False, key: Key | None = None
) -> FoldResult:
    """Commit the folded backups and the target into the chain's full; write the target's
    manifest as a full (``manifest.json.new``)."""
    started = dt.datetime.now(dt.UTC)
    full, target = repo.load(fold.folded[0]), repo.load(fold.target)
    disks: dict[str, DiskRecord] = {}
    merged = 0
    for disk in sorted(target.disks):
        # the gate, before qemu opens them
        with checked_chain(repo, target, disk, encrypted=key is not None) as files:
            if files[0].backup != full.id:
                raise RepositoryError(f"backup {target.id} is not built on {full.id}")
            touched: set[int] = set()
            for checked in files[1:]:
                touched |= records.held_clusters(checked.fd)
            merged += len(touched) * target.disks[disk].cluster_size
            await _commit(repo, files, disk, key)
        await _after_qemu(repo, full.id, disk, resumed, key)
        checkpoint("merge-after-qemu-img")
        fd = repo.open_file(full.id, image_name(disk))
        try:
            os.fsync(fd)
            file_key = _file_key(fd, key, f"backup {full.id}, disk {disk}")
            disks[disk] = records.after_down(
                fd, full.disks[disk], target.disks[disk], touched, file_key
            )
        finally:
            os.close(fd)
    manifest = dataclasses.replace(
        target, kind=Kind.FULL, parent=None, disks=disks, reason=_stamp(target.reason, fold)
    )
    _write_new_manifest(repo, manifest)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return FoldResult(manifest, merged, seconds)


async def fold_up(
    repo: VMRepository, fold: Fold, resumed: bool = False, key: Key | None = None
) -> FoldResult:
    """Rebase the target onto the kept backup below the folded ones; write its manifest
    with that parent (``manifest.json.new``)."""
    assert fold.parent is not None
    started = dt.datetime.now(dt.UTC)
    target, lower = repo.load(fold.target), repo.load(fold.parent)
    disks: dict[str, DiskRecord] = {}
    merged = 0
    for disk in sorted(target.disks):
        new_backing = f"../{lower.id}/{image_name(disk)}"
        encrypted = key is not None
        with checked_chain(repo, lower, disk, encrypted=encrypted) as below:
            if _backing(repo, target.id, disk, key) != new_backing:  # not rebased yet
                with checked_chain(repo, target, disk, encrypted=encrypted) as files:
                    held = [records.held_clusters(c.fd) for c in files if c.backup in fold.folded]
                    merged += len(set().union(*held)) * target.disks[disk].cluster_size
                    await _rebase(repo, files, below, disk, key)
            await _after_qemu(repo, target.id, disk, resumed, key, (new_backing, len(below)))
        checkpoint("merge-after-qemu-img")
        with checked_chain(repo, lower, disk, encrypted=encrypted):  # the new chain passes
            checked = check_image(repo, target, disk, lower, allow_encryption=encrypted)
        try:
            os.fsync(checked.fd)
            file_key = _file_key(checked.fd, key, f"backup {target.id}, disk {disk}")
            disks[disk] = records.after_up(checked.fd, target.disks[disk], file_key)
        finally:
            checked.image.close()
    manifest = dataclasses.replace(
        target, parent=lower.id, disks=disks, reason=_stamp(target.reason, fold)
    )
    _write_new_manifest(repo, manifest)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return FoldResult(manifest, merged, seconds)


def check_fold(repo: VMRepo, what: Fold, key: Key | None = None) -> None:
    """Pass every file the fold will hand to qemu through the gate, and (encrypted)
    check that the key opens it, before anything changes (nothing is merged); on any
    storage."""
    target = repo.load(what.target)
    for backup in (what.target, *what.folded):
        check_digests(target if backup == what.target else repo.load(backup))
    for disk in sorted(target.disks):
        with checked_chain(repo, target, disk, encrypted=key is not None) as files:
            for checked in files if key is not None else ():
                where = f"backup {checked.backup} of vm {repo.vm}, disk {disk}"
                try:
                    _file_key(checked.image.inspectable, key, where)
                except ValueError as exc:  # WrongKey, or a LUKS header refused
                    raise EncryptionKeyError(f"nothing merged: {exc}") from None


async def fold(
    repo: VMRepository, what: Fold, resumed: bool = False, key: Key | None = None
) -> FoldResult:
    """Fold ``what`` (``resumed``: a kill may have interrupted it before; ``key``: the
    VM's encryption key, its files are encrypted)."""
    step = fold_down if what.direction is Direction.DOWN else fold_up
    return await step(repo, what, resumed, key)


def exchange(repo: VMRepository, what: Fold) -> None:
    """Put the fold's result in place: (down) the full's files over the target's, then
    (both) the target's new manifest over its old one.  Idempotent."""
    target = repo.folder(what.target)
    try:
        if what.direction is Direction.DOWN:
            with contextlib.suppress(FileNotFoundError):
                _move_files(repo, what.folded[0], target)
        checkpoint("merge-before-manifest")
        try:
            os.rename(NEW_MANIFEST, MANIFEST, src_dir_fd=target, dst_dir_fd=target)
        except FileNotFoundError:
            return  # done before
        os.fsync(target)
    finally:
        os.close(target)


def _move_files(repo: VMRepository, full: str, target: int) -> None:
    source = repo.folder(full)
    try:
        for name in sorted(os.listdir(source)):
            if name.endswith(".qcow2"):
                os.rename(name, name, src_dir_fd=source, dst_dir_fd=target)
                checkpoint("merge-mid-exchange")
        os.fsync(target)
        os.fsync(source)
    finally:
        os.close(source)


def remove_backup(repo: VMRepository, backup: str) -> None:
    """Remove a dropped backup's folder (a real folder of this VM, never a symlink)."""
    path = repo.path / backup
    try:
        os.close(repo.folder(backup))  # a real folder of this VM (no symlink), or refused
    except FileNotFoundError:
        return
    except RepositoryError as exc:
        raise RepositoryError(f"cannot remove backup {backup}: {exc}") from None
    shutil.rmtree(path)
    with contextlib.suppress(OSError):
        fd = repo.folder()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _local(repo: VMRepo) -> VMRepository:
    assert isinstance(repo, VMRepository)
    return repo


class _LocalSteps:
    """A merge on a local disk: qemu-img in place, files renamed, folders removed."""

    def check_fold(self, repo: VMRepo, what: Fold, key: Key | None = None) -> None:
        check_fold(repo, what, key)

    async def fold(
        self, repo: VMRepo, what: Fold, resumed: bool = False, key: Key | None = None
    ) -> FoldResult:
        return await fold(_local(repo), what, resumed, key)

    def exchange(self, repo: VMRepo, what: Fold) -> None:
        exchange(_local(repo), what)

    def remove(self, repo: VMRepo, backup: str) -> None:
        remove_backup(_local(repo), backup)


LOCAL_STEPS = _LocalSteps()

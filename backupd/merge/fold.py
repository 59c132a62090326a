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

from backupd.chain import check_image, checked_chain, image_name
from backupd.errors import RepositoryError
from backupd.faults import checkpoint
from backupd.manifest import DiskRecord, Kind, Manifest
from backupd.merge import records
from backupd.merge.plan import Direction, Fold
from backupd.qcow2 import layout
from backupd.qcow2.inspector import ImageRefused, inspect_image
from backupd.qemu.tools import qemu_img
from backupd.repository import MANIFEST, VMRepository
from backupd.storage.vmrepo import VMRepo

log = logging.getLogger("backupd.merge")

NEW_MANIFEST = MANIFEST + ".new"


@dataclass(frozen=True, slots=True)
class FoldResult:
    manifest: Manifest
    #: guest bytes the folded backups held (what was merged)
    merged: int
    seconds: float


def _backing(repo: VMRepository, backup: str, disk: str) -> str | None:
    fd = repo.open_file(backup, image_name(disk))
    try:
        return inspect_image(fd, allow_encryption=False).backing_file
    except ImageRefused:
        return _raw_backing(fd)  # qemu's header form, before it is rewritten
    finally:
        os.close(fd)


def _raw_backing(fd: int) -> str | None:
    head = os.pread(fd, layout.HEADER_LENGTH, 0)
    offset, length = struct.unpack_from(">QI", head, 8)
    return os.pread(fd, length, offset).decode() if offset else None


def canonical_header(repo: VMRepository, backup: str, disk: str) -> None:
    """Rewrite a file's header in backupd's own form (the fields qemu left, the backing
    format extension, the backing name; nothing else), in place and durably.  The whole
    new header lies in the first sector, so even a torn write leaves a valid image."""
    folder = repo.folder(backup)
    try:
        fd = os.open(image_name(disk), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    finally:
        os.close(folder)
    try:
        head = os.pread(fd, layout.HEADER_LENGTH, 0)
        fields = layout.HEADER.unpack(head)
        cluster_bits = int(fields[4])
        backing = _raw_backing(fd)
        header = layout.encode_header(
            cluster_bits=cluster_bits,
            size=int(fields[5]),
            l1_size=int(fields[7]),
            l1_offset=int(fields[8]),
            refcount_table_offset=int(fields[9]),
            refcount_table_clusters=int(fields[10]),
            backing_file=backing,
            backing_format="qcow2" if backing else None,
        )
        old = os.pread(fd, 1 << cluster_bits, 0)
        if old.startswith(header) and not old[len(header) :].strip(b"\0"):
            return  # already ours
        used = len(old.rstrip(b"\0"))
        os.pwrite(fd, header + bytes(max(0, used - len(header))), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _after_qemu(repo: VMRepository, backup: str, disk: str, resumed: bool) -> None:
    """What qemu-img leaves to tidy: a header of qemu's form, and (after a qemu-img that a
    kill interrupted, which only a resumed merge can meet) leaked clusters."""
    if resumed:
        path = f"{backup}/{image_name(disk)}"
        await qemu_img("check", "-q", "-r", "leaks", "-f", "qcow2", path, cwd=repo.path)
    canonical_header(repo, backup, disk)


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


async def fold_down(repo: VMRepository, fold: Fold, resumed: bool = False) -> FoldResult:
    """Commit the folded backups and the target into the chain's full; write the target's
    manifest as a full (``manifest.json.new``)."""
    started = dt.datetime.now(dt.UTC)
    full, target = repo.load(fold.folded[0]), repo.load(fold.target)
    disks: dict[str, DiskRecord] = {}
    merged = 0
    for disk in sorted(target.disks):
        with checked_chain(repo, target, disk) as files:  # the gate, before qemu opens them
            if files[0].backup != full.id:
                raise RepositoryError(f"backup {target.id} is not built on {full.id}")
            touched: set[int] = set()
            for checked in files[1:]:
                touched |= records.held_clusters(checked.fd)
        merged += len(touched) * target.disks[disk].cluster_size
        base = f"../{full.id}/{image_name(disk)}"
        await qemu_img(
            "commit", "-q", "-f", "qcow2", "-d", "-b", base,
            f"{target.id}/{image_name(disk)}", cwd=repo.path,
        )  # fmt: skip
        await _after_qemu(repo, full.id, disk, resumed)
        checkpoint("merge-after-qemu-img")
        fd = repo.open_file(full.id, image_name(disk))
        try:
            os.fsync(fd)
            disks[disk] = records.after_down(fd, full.disks[disk], target.disks[disk], touched)
        finally:
            os.close(fd)
    manifest = dataclasses.replace(
        target, kind=Kind.FULL, parent=None, disks=disks, reason=_stamp(target.reason, fold)
    )
    _write_new_manifest(repo, manifest)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return FoldResult(manifest, merged, seconds)


async def fold_up(repo: VMRepository, fold: Fold, resumed: bool = False) -> FoldResult:
    """Rebase the target onto the kept backup below the folded ones; write its manifest
    with that parent (``manifest.json.new``)."""
    assert fold.parent is not None
    started = dt.datetime.now(dt.UTC)
    target, lower = repo.load(fold.target), repo.load(fold.parent)
    disks: dict[str, DiskRecord] = {}
    merged = 0
    for disk in sorted(target.disks):
        new_backing = f"../{lower.id}/{image_name(disk)}"
        if _backing(repo, target.id, disk) != new_backing:  # not rebased yet
            with checked_chain(repo, target, disk) as files:
                held = [records.held_clusters(c.fd) for c in files if c.backup in fold.folded]
            merged += len(set().union(*held)) * target.disks[disk].cluster_size
            await qemu_img(
                "rebase", "-q", "-f", "qcow2", "-b", new_backing, "-F", "qcow2",
                f"{target.id}/{image_name(disk)}", cwd=repo.path,
            )  # fmt: skip
        await _after_qemu(repo, target.id, disk, resumed)
        checkpoint("merge-after-qemu-img")
        with checked_chain(repo, lower, disk):  # the new chain passes the gate
            checked = check_image(repo, target, disk, lower)
        try:
            os.fsync(checked.fd)
            disks[disk] = records.after_up(checked.fd, target.disks[disk])
        finally:
            os.close(checked.fd)
    manifest = dataclasses.replace(
        target, parent=lower.id, disks=disks, reason=_stamp(target.reason, fold)
    )
    _write_new_manifest(repo, manifest)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return FoldResult(manifest, merged, seconds)


def check_fold(repo: VMRepository, what: Fold) -> None:
    """Pass every file the fold will hand to qemu through the gate, before anything
    changes (ChainError: nothing is merged)."""
    target = repo.load(what.target)
    for disk in sorted(target.disks):
        with checked_chain(repo, target, disk):
            pass


async def fold(repo: VMRepository, what: Fold, resumed: bool = False) -> FoldResult:
    """Fold ``what`` (``resumed``: a kill may have interrupted it before)."""
    step = fold_down if what.direction is Direction.DOWN else fold_up
    return await step(repo, what, resumed)


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

    def check_fold(self, repo: VMRepo, what: Fold) -> None:
        check_fold(_local(repo), what)

    async def fold(self, repo: VMRepo, what: Fold, resumed: bool = False) -> FoldResult:
        return await fold(_local(repo), what, resumed)

    def exchange(self, repo: VMRepo, what: Fold) -> None:
        exchange(_local(repo), what)

    def remove(self, repo: VMRepo, backup: str) -> None:
        remove_backup(_local(repo), backup)


LOCAL_STEPS = _LocalSteps()

"""The repository on disk: one folder per VM, one folder per backup, atomic commits.

```
<repository>/<vm>/<backup-id>/manifest.json, <disk>.qcow2
<repository>/<vm>/.lock
<repository>/<vm>/.tmp-<backup-id>/      a run in progress; never read as a backup
```
Backup ids are UTC times (``20261124T030000Z``) and sort by time.  Files are 0600 and
folders 0700.  A backup appears only complete: data and manifest are written into the
staging folder, fsynced, then the folder is renamed and the VM folder fsynced.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from backupd.errors import NotFoundError, RepositoryError, UsageError
from backupd.faults import checkpoint
from backupd.lock import vm_lock
from backupd.manifest import Manifest
from backupd.names import check_name, is_backup_id
from backupd.repofiles import fsync_dir, open_folder, open_regular
from backupd.storage.images import LocalImage
from backupd.storage.vmrepo import (
    ID_FORMAT,
    MANIFEST,
    MERGE_JOURNAL,
    Leftover,
    MergeSteps,
    VMRepo,
    backup_id,
    parse_manifest,
)

if TYPE_CHECKING:
    from backupd.config import Transfer
    from backupd.qcow2.encryption import ImageKey
    from backupd.qcow2.sink import Qcow2Sink

__all__ = ["ID_FORMAT", "MANIFEST", "MERGE_JOURNAL", "Repository", "VMRepository", "backup_id"]

STAGING_PREFIX = ".tmp-"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class StagedBackup:
    """A backup being written: files go into the staging folder until :meth:`commit`."""

    def __init__(self, vm_repo: VMRepository, backup: str) -> None:
        self.vm_repo = vm_repo
        self.id = backup
        self.path = vm_repo.path / f"{STAGING_PREFIX}{backup}"
        self.final = vm_repo.path / backup
        self.committed = False

    def file(self, disk: str) -> Path:
        return self.path / f"{check_name('disk', disk, RepositoryError)}.qcow2"

    @property
    def where(self) -> str:
        return str(self.path)

    def read_buffers(self, settings: Transfer) -> int | None:
        return None  # the default: local disks write as fast as qemu reads

    def sink(
        self,
        disk: str,
        size: int,
        *,
        backing_file: str | None,
        compress: bool,
        expected: int = 0,
        disks: int = 1,
        encryption: tuple[ImageKey, bytes] | None = None,
    ) -> Qcow2Sink:
        """A new qcow2 file for ``disk`` in the staging folder, as a copy engine sink
        (removed again on abort); ``encryption``: its key and LUKS header region."""
        from backupd.qcow2.sink import Qcow2Sink

        return Qcow2Sink.create(
            self.file(disk),
            size,
            backing_file=backing_file,
            digests=True,
            compress=compress,
            encryption=encryption,
        )

    def commit(self, manifest: Manifest) -> Path:
        """fsync every file, write the manifest, rename into place, fsync the VM folder."""
        # (the staging folder is ours, but the repository is not trusted: never follow)
        for entry in self.path.iterdir():
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp = self.path / (MANIFEST + ".new")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, manifest.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / MANIFEST)
        fsync_dir(self.path)
        if self.final.exists():
            raise RepositoryError(f"backup {self.id} of vm {self.vm_repo.vm} already exists")
        checkpoint("before-rename")
        os.rename(self.path, self.final)
        fsync_dir(self.vm_repo.path)
        self.committed = True
        return self.final

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


class VMRepository(VMRepo):
    """The backups of one VM in a local folder.  Everything below the repository root
    is untrusted: folders and files are opened without following symlinks, and only
    what has exactly the layout's name and type is read."""

    def __init__(self, root: Path, vm: str) -> None:
        super().__init__(vm)
        self.root = root
        self.path = root / vm
        # manifests already parsed, by id: (inode, size, mtime) of the file, manifest
        self._loaded: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    @property
    def where(self) -> str:
        return str(self.root)

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @property
    def readers_path(self) -> Path:
        """The lock shared by everything that reads backups, exclusive for prune."""
        return self.path / ".readers"

    def check_readable(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # no run yet
            os.stat(self.path)

    def ensure(self) -> None:
        for folder in (self.root, self.path):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = self._vm_folder()
        assert fd is not None
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False, purpose: str = "") -> Iterator[None]:
        self.ensure()
        with vm_lock(self.lock_path, self.vm, shared=shared, purpose=purpose):
            yield

    @contextlib.contextmanager
    def readers(self, *, exclusive: bool = False, purpose: str = "") -> Iterator[None]:
        """Shared by serve/restore/verify while they read backups; exclusive for prune."""
        self.ensure()
        with vm_lock(self.readers_path, self.vm, shared=not exclusive, purpose=purpose):
            yield

    def _vm_folder(self) -> int | None:
        """The VM's folder, opened without following a symlink (None when absent)."""
        try:
            return open_folder(self.path, None, f"the folder of vm {self.vm} ({self.path})")
        except FileNotFoundError:
            return None

    def _entries(self) -> list[os.DirEntry[str]]:
        fd = self._vm_folder()
        if fd is None:
            return []
        try:
            with os.scandir(fd) as entries:
                return list(entries)
        finally:
            os.close(fd)

    def ids(self) -> list[str]:
        """Every backup id in the VM's folder, damaged ones (a symlink or anything but a
        folder under a backup's name) included: :meth:`load` says what is wrong."""
        return sorted(
            e.name
            for e in self._entries()
            if is_backup_id(e.name) and not e.is_file(follow_symlinks=False)
        )

    def open_file(self, backup: str, name: str) -> int:
        """A read-only descriptor for ``<vm>/<backup>/<name>``: the VM folder, the backup
        folder and the file must be exactly that (no symlink, the file a regular file).
        NotFoundError without that backup; FileNotFoundError without that file."""
        if not is_backup_id(backup):
            raise UsageError(f"invalid backup id {backup!r} (expected like 20261124T030000Z)")
        vm_fd = self._vm_folder()
        if vm_fd is None:
            raise NotFoundError(f"vm {self.vm} has no backup {backup}")
        try:
            try:
                folder = open_folder(backup, vm_fd, f"backup {backup} of vm {self.vm}")
            except FileNotFoundError:
                raise NotFoundError(f"vm {self.vm} has no backup {backup}") from None
            try:
                return open_regular(name, folder, f"{name} of backup {backup} of vm {self.vm}")
            finally:
                os.close(folder)
        finally:
            os.close(vm_fd)

    def folder(self, backup: str | None = None) -> int:
        """A descriptor of the VM's folder, or of one backup's folder in it, opened
        without following a symlink at any level (for writes made with ``dir_fd``);
        FileNotFoundError when it is absent.  The caller closes it."""
        vm_fd = self._vm_folder()
        if vm_fd is None:
            raise FileNotFoundError(self.path)
        if backup is None:
            return vm_fd
        if not is_backup_id(backup):
            raise UsageError(f"invalid backup id {backup!r} (expected like 20261124T030000Z)")
        try:
            return open_folder(backup, vm_fd, f"backup {backup} of vm {self.vm}")
        finally:
            os.close(vm_fd)

    def write_own_file(self, name: str, data: bytes) -> None:
        """Replace backupd's own file ``<vm>/<name>`` atomically (0600, never through a
        symlink), and make the change durable."""
        folder = self.folder()
        tmp = f".{name}.{os.urandom(6).hex()}"
        try:
            fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=folder)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            os.fsync(folder)
        finally:
            os.close(folder)

    def remove_own_file(self, name: str) -> None:
        folder = self.folder()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
            os.fsync(folder)
        finally:
            os.close(folder)

    def read_own_file(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """The content of backupd's own file ``<vm>/<name>`` (``.status.json``), read
        without following a symlink; None when it is absent, not a regular file or
        larger than ``limit``."""
        folder = self._vm_folder()
        if folder is None:
            return None
        try:
            fd = open_regular(name, folder, f"{name} of vm {self.vm}")
        except (OSError, RepositoryError):
            return None
        finally:
            os.close(folder)
        with open(fd, "rb") as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None

    def load(self, backup: str) -> Manifest:
        """The manifest of ``backup`` (RepositoryError when it is damaged)."""
        try:
            fd = self.open_file(backup, MANIFEST)
        except FileNotFoundError:
            raise RepositoryError(f"backup {backup} of vm {self.vm} has no manifest") from None
        path = self.path / backup / MANIFEST
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._loaded.get(backup)
            if cached is not None and cached[0] == identity:
                return cached[1]  # parsed before and unchanged (a chain walk after latest)
            raw = f.read()
        manifest = parse_manifest(raw, self.vm, backup, str(path))
        self._loaded[backup] = (identity, manifest)
        return manifest

    def pending_ids(self) -> list[str]:
        return [
            name[len(STAGING_PREFIX) :]
            for name in (p.name for p in self.staging())
            if is_backup_id(name[len(STAGING_PREFIX) :])
        ]

    def leftovers(self) -> list[Leftover]:
        return [
            Leftover(stale.name, functools.partial(shutil.rmtree, stale, ignore_errors=True))
            for stale in self.staging()
        ]

    def merge_steps(self) -> MergeSteps:
        from backupd.merge.fold import LOCAL_STEPS

        return LOCAL_STEPS

    def image(self, backup: str, name: str) -> LocalImage:
        """The file ``<vm>/<backup>/<name>`` opened as :meth:`open_file` does."""
        return LocalImage(self.open_file(backup, name), self.path / backup / name)

    def stage(self, backup: str) -> StagedBackup:
        self.ensure()
        staged = StagedBackup(self, backup)
        staged.path.mkdir(mode=0o700)
        return staged

    def staging(self) -> list[Path]:
        return [self.path / e.name for e in self._entries() if e.name.startswith(STAGING_PREFIX)]


IDENTITY_FILE = ".repository-id"
IDENTITY_RE = re.compile(r"[0-9a-f]{8}")


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def identity(self) -> str:
        """This repository's short random id (made on first use): it names the checkpoint
        bitmaps in qemu, so several repositories of one VM keep their own chains.  It is
        written whole under a temporary name and linked into place, so two first runs at
        once agree on one id and never read a half-written one."""
        path = self.root / IDENTITY_FILE
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.path.lexists(path):
            fd, tmp = tempfile.mkstemp(prefix=".repository-id.", dir=self.root)
            try:
                os.write(fd, (os.urandom(4).hex() + "\n").encode())
                os.fsync(fd)
                os.close(fd)
                with contextlib.suppress(FileExistsError):  # another run was first
                    os.link(tmp, path)
                fsync_dir(self.root)
            finally:
                os.unlink(tmp)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                text = os.read(fd, 64).decode(errors="replace").strip()
            finally:
                os.close(fd)
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}: {exc.strerror}") from None
        if not IDENTITY_RE.fullmatch(text):
            raise RepositoryError(f"{path} is damaged (expected 8 hex digits, found {text!r:.40})")
        return text

    def vm(self, name: str) -> VMRepository:
        return VMRepository(self.root, name)

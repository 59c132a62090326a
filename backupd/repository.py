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
import datetime as dt
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from backupd.errors import ChainError, NotFoundError, RepositoryError, UsageError
from backupd.faults import checkpoint
from backupd.lock import vm_lock
from backupd.manifest import Manifest
from backupd.names import check_name, is_backup_id
from backupd.repofiles import open_folder, open_regular

ID_FORMAT = "%Y%m%dT%H%M%SZ"
STAGING_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


#: the journal of a merge in progress (backupd.merge.journal)
MERGE_JOURNAL = ".merge.json"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_id(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime(ID_FORMAT)


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


class VMRepository:
    """The backups of one VM.  Everything below the repository root is untrusted:
    folders and files are opened without following symlinks, and only what has
    exactly the layout's name and type is read."""

    def __init__(self, root: Path, vm: str) -> None:
        self.vm = check_name("VM", vm, UsageError)
        self.root = root
        self.path = root / vm
        # manifests already parsed, by id: (inode, size, mtime) of the file, manifest
        self._loaded: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @property
    def readers_path(self) -> Path:
        """The lock shared by everything that reads backups, exclusive for prune."""
        return self.path / ".readers"

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
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise RepositoryError(f"corrupt manifest {path}: {exc}") from None
        manifest = Manifest.from_json(text, str(path))
        if manifest.id != backup or manifest.vm != self.vm:
            raise RepositoryError(f"manifest {path} belongs to {manifest.vm}/{manifest.id}")
        self._loaded[backup] = (identity, manifest)
        return manifest

    def backups(self) -> list[Manifest]:
        return [self.load(b) for b in self.ids()]

    def latest(self) -> Manifest | None:
        ids = self.ids()
        return self.load(ids[-1]) if ids else None

    def latest_good(self) -> tuple[Manifest | None, list[tuple[str, str]]]:
        """The newest backup whose manifest is sound, and the newer ones skipped because
        theirs is damaged, with why (a run continues from the newest good backup)."""
        skipped: list[tuple[str, str]] = []
        for backup in reversed(self.ids()):
            try:
                return self.load(backup), skipped
            except RepositoryError as exc:
                skipped.append((backup, str(exc)))
        return None, skipped

    def unfinished_merge(self) -> bool:
        """A merge (prune) was interrupted and is not finished yet."""
        return self.read_own_file(MERGE_JOURNAL) is not None

    def refuse_unfinished_merge(self) -> None:
        """RepositoryError while a merge is unfinished (its backups are being changed):
        for commands that read backups."""
        if self.unfinished_merge():
            raise RepositoryError(
                f"vm {self.vm}: a merge (prune) was interrupted; finish it first with "
                f"backupd prune --vm {self.vm} (or the next backupd run)"
            )

    def resolve(self, backup: str | None) -> Manifest:
        """A backup by id, or the newest for None / ``latest`` (refused while a merge is
        unfinished)."""
        self.refuse_unfinished_merge()
        if backup in (None, "latest"):
            latest = self.latest()
            if latest is None:
                raise NotFoundError(f"vm {self.vm} has no backups in {self.root}")
            return latest
        assert backup is not None
        return self.load(backup)

    def chain(self, backup: str) -> list[Manifest]:
        """The backups ``backup`` depends on, from its full to itself.  Always ends:
        a missing or damaged parent or a cycle is a ChainError."""
        chain = [self.load(backup)]
        seen = {backup}
        while chain[-1].parent is not None:
            child, parent = chain[-1], chain[-1].parent
            if parent in seen:
                raise ChainError(f"backup {child.id} of vm {self.vm}: its chain loops at {parent}")
            seen.add(parent)
            try:
                chain.append(self.load(parent))
            except NotFoundError:
                raise ChainError(
                    f"backup {child.id} of vm {self.vm} needs missing parent {parent}"
                ) from None
            except RepositoryError as exc:
                raise ChainError(
                    f"backup {child.id} of vm {self.vm} needs damaged parent {parent}: {exc}"
                ) from None
        return list(reversed(chain))

    def new_id(self, now: dt.datetime | None = None) -> str:
        """An id for a new backup: now, or one second after the newest id in the folder
        when the clock is behind it (computed, not searched: a clock a year behind costs
        nothing)."""
        candidate = backup_id(now or dt.datetime.now(dt.UTC))
        taken = self.ids() + [p.name[len(STAGING_PREFIX) :] for p in self.staging()]
        newest = max((b for b in taken if is_backup_id(b)), default=None)
        if newest is not None and candidate <= newest:
            moment = dt.datetime.strptime(newest, ID_FORMAT).replace(tzinfo=dt.UTC)
            candidate = backup_id(moment + dt.timedelta(seconds=1))
        return candidate

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

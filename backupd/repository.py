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
from collections.abc import Iterator
from pathlib import Path

from backupd.config import check_name
from backupd.errors import ChainError, NotFoundError, RepositoryError, UsageError
from backupd.faults import checkpoint
from backupd.lock import vm_lock
from backupd.manifest import Manifest

ID_RE = re.compile(r"^\d{8}T\d{6}Z$")
STAGING_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_id(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


class StagedBackup:
    """A backup being written: files go into the staging folder until :meth:`commit`."""

    def __init__(self, vm_repo: VMRepository, backup: str) -> None:
        self.vm_repo = vm_repo
        self.id = backup
        self.path = vm_repo.path / f"{STAGING_PREFIX}{backup}"
        self.final = vm_repo.path / backup
        self.committed = False

    def file(self, disk: str) -> Path:
        return self.path / f"{check_name('disk', disk)}.qcow2"

    def commit(self, manifest: Manifest) -> Path:
        """fsync every file, write the manifest, rename into place, fsync the VM folder."""
        for entry in self.path.iterdir():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp = self.path / (MANIFEST + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
    def __init__(self, root: Path, vm: str) -> None:
        self.vm = check_name("VM", vm)
        self.root = root
        self.path = root / vm
        # manifests already parsed, by id: (inode, size, mtime) of the file, manifest
        self._loaded: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def ensure(self) -> None:
        for folder in (self.root, self.path):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False, purpose: str = "") -> Iterator[None]:
        self.ensure()
        with vm_lock(self.lock_path, self.vm, shared=shared, purpose=purpose):
            yield

    @contextlib.contextmanager
    def readers(self, *, exclusive: bool = False, purpose: str = "") -> Iterator[None]:
        """Shared by serve/restore/verify while they read backups; exclusive for prune."""
        self.ensure()
        with vm_lock(self.path / ".readers", self.vm, shared=not exclusive, purpose=purpose):
            yield

    def ids(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if ID_RE.match(p.name) and p.is_dir())

    def load(self, backup: str) -> Manifest:
        if not ID_RE.match(backup):
            raise UsageError(f"invalid backup id {backup!r} (expected like 20261124T030000Z)")
        path = self.path / backup / MANIFEST
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._loaded.get(backup)
                if cached is not None and cached[0] == identity:
                    return cached[1]  # parsed before and unchanged (a chain walk after latest)
                text = f.read().decode()
        except FileNotFoundError:
            if (self.path / backup).is_dir():
                raise RepositoryError(f"backup {backup} of vm {self.vm} has no manifest") from None
            raise NotFoundError(f"vm {self.vm} has no backup {backup}") from None
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

    def resolve(self, backup: str | None) -> Manifest:
        """A backup by id, or the newest for None / ``latest``."""
        if backup in (None, "latest"):
            latest = self.latest()
            if latest is None:
                raise NotFoundError(f"vm {self.vm} has no backups in {self.root}")
            return latest
        assert backup is not None
        return self.load(backup)

    def chain(self, backup: str) -> list[Manifest]:
        """The backups ``backup`` depends on, from its full to itself."""
        chain: list[Manifest] = []
        current: str | None = backup
        while current is not None:
            manifest = self.load(current)
            chain.append(manifest)
            if manifest.kind == "full":
                break
            current = manifest.parent
            if current is None or len(chain) > 10000:
                raise ChainError(f"backup {backup} of vm {self.vm} has a broken chain")
            if not (self.path / current).is_dir():
                raise ChainError(
                    f"backup {manifest.id} of vm {self.vm} needs missing parent {current}"
                )
        return list(reversed(chain))

    def new_id(self, now: dt.datetime | None = None) -> str:
        moment = now or dt.datetime.now(dt.UTC)
        existing = set(self.ids()) | {p.name[len(STAGING_PREFIX) :] for p in self.staging()}
        candidate = backup_id(moment)
        while candidate in existing or (self.ids() and candidate <= self.ids()[-1]):
            moment += dt.timedelta(seconds=1)
            candidate = backup_id(moment)
        return candidate

    def stage(self, backup: str) -> StagedBackup:
        self.ensure()
        staged = StagedBackup(self, backup)
        staged.path.mkdir(mode=0o700)
        return staged

    def staging(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name.startswith(STAGING_PREFIX)]


IDENTITY_FILE = ".repository-id"
IDENTITY_RE = re.compile(r"[0-9a-f]{8}")


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def identity(self) -> str:
        """This repository's short random id (made on first use): it names the checkpoint
        bitmaps in qemu, so several repositories of one VM keep their own chains."""
        path = self.root / IDENTITY_FILE
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, (os.urandom(4).hex() + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.root)
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

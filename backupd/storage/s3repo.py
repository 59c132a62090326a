"""A repository in a bucket of an S3-compatible store: the local layout as object keys.

```
PREFIX/.repository-id                         names this repository's bitmaps in qemu
PREFIX/<vm>/<backup-id>/<disk>.qcow2          written first (multipart uploads)
PREFIX/<vm>/<backup-id>/manifest.json         written last: the backup exists from then on
PREFIX/<vm>/<backup-id>/.lease                while a run writes the backup (leases.py)
PREFIX/<vm>/.status.json, .merge.json         backupd's own small files
```

A backup is a folder *with* a manifest; a folder without one is a run in progress or
what a killed one left (:meth:`S3VMRepository.pending_ids`, cleaned by the next run:
:mod:`backupd.storage.leases`).  Objects have no rename, so nothing is staged under
another name: the manifest's arrival is the commit.  Everything read is untrusted as
on a local disk: keys are built from checked names only, a manifest larger than
:data:`MAX_MANIFEST` is refused before it is read, and images pass the gate
(:class:`~backupd.storage.s3image.ObjectImage` pins what the gate read).

Locks are host-local (``runtime_dir``): S3 has no lock, and servers without
conditional writes (Swift) cannot build one, so one host backs up a given VM into a
given repository (see the README).  Where the server supports ``If-None-Match``, a
manifest never replaces another.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from backupd.errors import NotFoundError, RepositoryError, UsageError
from backupd.lock import vm_lock
from backupd.manifest import Manifest
from backupd.names import is_backup_id, is_name
from backupd.storage.vmrepo import MANIFEST, Leftover, MergeSteps, VMRepo, parse_manifest

if TYPE_CHECKING:
    from backupd.objectstore.objects import ObjectInfo
    from backupd.storage.s3image import ObjectImage
    from backupd.storage.s3stage import S3StagedBackup
    from backupd.storage.s3store import S3Storage

log = logging.getLogger("backupd.s3")

IDENTITY_FILE = ".repository-id"
#: a manifest larger than this is refused unread (a full backup of 1 TiB has ~50 MiB)
MAX_MANIFEST = 512 << 20


@dataclass
class Scan:
    """The objects below one VM's folder, by place in the layout."""

    #: backup id -> file name -> object
    backups: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)
    #: backupd's own files of the VM (``.status.json`` ...)
    own: dict[str, ObjectInfo] = field(default_factory=dict)

    def committed(self) -> list[str]:
        return sorted(b for b, files in self.backups.items() if MANIFEST in files)

    def pending(self) -> list[str]:
        return sorted(b for b, files in self.backups.items() if MANIFEST not in files)


class S3Repository:
    """The root of a repository in a bucket (``s3://BUCKET/PREFIX``)."""

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self.root = storage.url

    def identity(self) -> str:
        """This repository's short random id (made on first use), as on a local disk."""
        from backupd.repository import IDENTITY_RE

        key = self.storage.location.key(IDENTITY_FILE)
        raw = self.storage.get(key)
        if raw is None:
            self.storage.put(key, (os.urandom(4).hex() + "\n").encode(), if_absent=True)
            raw = self.storage.get(key) or b""
        text = raw[:64].decode(errors="replace").strip()
        if not IDENTITY_RE.fullmatch(text):
            raise RepositoryError(
                f"{self.root}/{IDENTITY_FILE} is damaged "
                f"(expected 8 hex digits, found {text!r:.40})"
            )
        return text

    def vm(self, name: str) -> S3VMRepository:
        return S3VMRepository(self.storage, name)


class S3VMRepository(VMRepo):
    """The backups of one VM in a bucket (see the module docstring)."""

    def __init__(self, storage: S3Storage, vm: str) -> None:
        super().__init__(vm)
        self.storage = storage
        self.root = storage.url
        self.folder_key = storage.location.folder(self.vm)
        self.path = PurePosixPath(f"{storage.url}/{self.vm}")
        self._loaded: dict[str, tuple[str, Manifest]] = {}
        #: the manifests the last scan saw
        self._manifests: dict[str, ObjectInfo] = {}

    @property
    def where(self) -> str:
        return self.root

    def key(self, *parts: str) -> str:
        return self.storage.location.key(self.vm, *parts)

    # -- what the bucket holds ----------------------------------------------------------

    def scan(self) -> Scan:
        """One listing of the VM's folder, sorted into the layout (anything else below
        it is not backupd's and is ignored)."""
        scan = Scan()
        for info in self.storage.listing(self.folder_key):
            rest = info.key[len(self.folder_key) :]
            backup, slash, name = rest.partition("/")
            if not slash:
                if backup.startswith(".") and is_name(backup[1:]):
                    scan.own[backup] = info
            elif is_backup_id(backup) and "/" not in name and name:
                scan.backups.setdefault(backup, {})[name] = info
        self._manifests = {
            b: files[MANIFEST] for b, files in scan.backups.items() if MANIFEST in files
        }
        return scan

    def ids(self) -> list[str]:
        return self.scan().committed()

    def pending_ids(self) -> list[str]:
        return self.scan().pending()

    def load(self, backup: str) -> Manifest:
        if not is_backup_id(backup):
            raise UsageError(f"invalid backup id {backup!r} (expected like 20261124T030000Z)")
        key = self.key(backup, MANIFEST)
        info = self._manifests.get(backup)
        cached = self._loaded.get(backup)
        if cached is not None and info is not None and cached[0] == info.etag:
            return cached[1]  # parsed before and unchanged (a chain walk after latest)
        if info is None:
            info = self.storage.head(key)
        if info is None:
            raise NotFoundError(f"vm {self.vm} has no backup {backup}")
        if info.size > MAX_MANIFEST:
            raise RepositoryError(
                f"manifest {self.root}/{self.vm}/{backup}/{MANIFEST} is {info.size} bytes: "
                "not a manifest backupd wrote"
            )
        raw = self.storage.get(key)
        if raw is None:
            raise NotFoundError(f"vm {self.vm} has no backup {backup}")
        manifest = parse_manifest(raw, self.vm, backup, f"{self.root}/{key}")
        self._loaded[backup] = (info.etag, manifest)
        return manifest

    def image(self, backup: str, name: str) -> ObjectImage:
        from backupd.storage.s3image import ObjectImage

        if not is_backup_id(backup):
            raise UsageError(f"invalid backup id {backup!r} (expected like 20261124T030000Z)")
        return ObjectImage.open(self.storage, self.key(backup, name))

    # -- backupd's own files --------------------------------------------------------------

    def read_own_file(self, name: str, limit: int = 1 << 20) -> bytes | None:
        info = self.storage.head(self.key(name))
        if info is None or info.size > limit:
            return None
        return self.storage.get(self.key(name))

    def write_own_file(self, name: str, data: bytes) -> None:
        self.storage.put(self.key(name), data)

    def remove_own_file(self, name: str) -> None:
        self.storage.delete([self.key(name)])

    def ensure(self) -> None:
        """Nothing to make: a bucket has no folders."""

    def check_readable(self) -> None:
        """Nothing to check before reading (a request says why it fails)."""

    # -- locks (host-local) ----------------------------------------------------------------

    def _lock_path(self, kind: str) -> Path:
        return self.storage.runtime / f"s3-{self.storage.identity}-{self.vm}.{kind}"

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False, purpose: str = "") -> Iterator[None]:
        with vm_lock(self._lock_path("lock"), self.vm, shared=shared, purpose=purpose):
            yield

    @contextlib.contextmanager
    def readers(self, *, exclusive: bool = False, purpose: str = "") -> Iterator[None]:
        path = self._lock_path("readers")
        with vm_lock(path, self.vm, shared=not exclusive, purpose=purpose):
            yield

    # -- writing ----------------------------------------------------------------------------

    def stage(self, backup: str) -> S3StagedBackup:
        from backupd.storage.s3stage import S3StagedBackup

        return S3StagedBackup.begin(self, backup)

    def leftovers(self) -> list[Leftover]:
        from backupd.storage.leases import leftovers

        return leftovers(self)

    def merge_steps(self) -> MergeSteps:
        from backupd.storage.s3merge import STEPS

        return STEPS

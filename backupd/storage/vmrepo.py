"""What every repository of one VM's backups answers, whatever holds the bytes: the
chain walk, the newest (sound) backup, a backup by id or ``latest``, an id for a new
backup, and whether a merge is unfinished.

:class:`VMRepo` is the base of the local repository (:class:`backupd.repository.
VMRepository`) and of the object-store one (:class:`backupd.storage.s3repo.
S3VMRepository`).  Subclasses say which backups exist (:meth:`VMRepo.ids`), read a
manifest (:meth:`VMRepo.load`) and the VM's own small files, open an image
(:meth:`VMRepo.image`) and stage a new backup; everything here is built on those, so
both behave alike, and the repository stays untrusted on both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from backupd.errors import ChainError, NotFoundError, RepositoryError, UsageError
from backupd.manifest import Manifest
from backupd.names import check_name

if TYPE_CHECKING:
    from backupd.config import Transfer
    from backupd.keys import Key
    from backupd.merge.fold import FoldResult
    from backupd.merge.plan import Fold
    from backupd.qcow2.encryption import ImageKey
    from backupd.qcow2.sink import Qcow2Sink
    from backupd.storage.images import ImageFile

ID_FORMAT = "%Y%m%dT%H%M%SZ"
MANIFEST = "manifest.json"
#: the journal of a merge in progress (backupd.merge.journal)
MERGE_JOURNAL = ".merge.json"


@dataclass
class Leftover:
    """Something a killed run left (named in the log) and how to remove it."""

    name: str
    remove: Callable[[], None]


class Staged(Protocol):
    """A backup being written: images first (:meth:`sink`), the manifest last."""

    id: str

    @property
    def where(self) -> str: ...

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
        """The image of ``disk`` as a copy engine sink (``encryption``: its key and LUKS
        header region)."""
        ...

    def read_buffers(self, settings: Transfer) -> int | None:
        """Read buffers of a run into it (None: :func:`backupd.transfer.run_pool`'s
        default)."""
        ...

    def commit(self, manifest: Manifest) -> object:
        """Make the backup exist (all its images are complete)."""
        ...

    def abort(self) -> None:
        """Remove what was written (no-op once committed)."""
        ...


def backup_id(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime(ID_FORMAT)


def parse_manifest(raw: bytes, vm: str, backup: str, where: str) -> Manifest:
    """A manifest read from the repository, which must be the one of ``vm/backup``."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise RepositoryError(f"corrupt manifest {where}: {exc}") from None
    manifest = Manifest.from_json(text, where)
    if manifest.id != backup or manifest.vm != vm:
        raise RepositoryError(f"manifest {where} belongs to {manifest.vm}/{manifest.id}")
    return manifest


class MergeSteps(Protocol):
    """The steps of a merge (backupd.merge.execute) on one kind of storage."""

    def check_fold(self, repo: VMRepo, what: Fold, key: Key | None = None) -> None: ...

    async def fold(
        self, repo: VMRepo, what: Fold, resumed: bool = False, key: Key | None = None
    ) -> FoldResult: ...

    def exchange(self, repo: VMRepo, what: Fold) -> None: ...

    def remove(self, repo: VMRepo, backup: str) -> None: ...


class VMRepo(ABC):
    """The backups of one VM (see the module docstring)."""

    def __init__(self, vm: str) -> None:
        self.vm = check_name("VM", vm, UsageError)

    # -- what a storage says --------------------------------------------------------

    @property
    @abstractmethod
    def where(self) -> str:
        """The repository, for messages (a path or an ``s3://`` URL)."""

    @abstractmethod
    def ids(self) -> list[str]:
        """Every backup id, oldest first."""

    @abstractmethod
    def load(self, backup: str) -> Manifest:
        """The manifest of ``backup`` (RepositoryError when it is damaged,
        NotFoundError when there is no such backup)."""

    @abstractmethod
    def pending_ids(self) -> list[str]:
        """Ids of backups being written or left by a killed run (never reused)."""

    @abstractmethod
    def image(self, backup: str, name: str) -> ImageFile:
        """The image ``name`` of ``backup``, opened for the gate (FileNotFoundError when
        absent, RepositoryError when something else is in its place)."""

    @abstractmethod
    def read_own_file(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """backupd's own small file ``<vm>/<name>`` (None when absent or unreadable)."""

    @abstractmethod
    def write_own_file(self, name: str, data: bytes) -> None:
        """Replace ``<vm>/<name>`` atomically and durably."""

    @abstractmethod
    def remove_own_file(self, name: str) -> None: ...

    @abstractmethod
    def lock(
        self, *, shared: bool = False, purpose: str = ""
    ) -> contextlib.AbstractContextManager[None]:
        """One run or prune of the VM at a time (BusyError when taken)."""

    @abstractmethod
    def readers(
        self, *, exclusive: bool = False, purpose: str = ""
    ) -> contextlib.AbstractContextManager[None]:
        """Shared by serve/restore/verify while they read backups; exclusive for prune."""

    @abstractmethod
    def stage(self, backup: str) -> Staged:
        """A new backup being written (committed by its ``commit(manifest)``)."""

    @abstractmethod
    def ensure(self) -> None:
        """Make the VM's place in the repository (where there is one to make)."""

    @abstractmethod
    def leftovers(self) -> list[Leftover]:
        """What killed runs left (the caller holds the VM's lock)."""

    @abstractmethod
    def merge_steps(self) -> MergeSteps:
        """How a merge folds, exchanges and removes backups here."""

    def check_readable(self) -> None:  # noqa: B027 (nothing to check for most storage)
        """PermissionError when the VM's backups cannot be read by this user."""

    # -- built on the above ---------------------------------------------------------

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
                raise NotFoundError(f"vm {self.vm} has no backups in {self.where}")
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
        newest = max([*self.ids(), *self.pending_ids()], default=None)
        if newest is not None and candidate <= newest:
            moment = dt.datetime.strptime(newest, ID_FORMAT).replace(tzinfo=dt.UTC)
            candidate = backup_id(moment + dt.timedelta(seconds=1))
        return candidate

"""A configuration's repository (or ``copy --to``'s), opened once per process.

:func:`repository_for` gives the root of the configured repository: a
:class:`~backupd.repository.Repository` for a folder, an
:class:`~backupd.storage.s3repo.S3Repository` for ``s3://BUCKET/PREFIX``.  An S3
repository's client and thread live until :func:`close_repositories` (called when a
command ends; at interpreter exit at the latest).
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from backupd.errors import UsageError
from backupd.private import private_dir, runtime_base
from backupd.repository import Repository
from backupd.storage.location import Location, S3Location

if TYPE_CHECKING:
    from backupd.config import Config
    from backupd.objectstore.settings import S3Settings
    from backupd.storage.s3repo import S3Repository
    from backupd.storage.s3store import S3Storage

_open: dict[tuple[str, str], S3Storage] = {}
_lock = threading.Lock()


def repository_for(config: Config) -> Repository | S3Repository:
    """The root of the configured repository."""
    return open_location(config.repository, config)


def local_repository(config: Config, what: str) -> Repository:
    """The configured repository when it is a local folder; UsageError naming ``what``
    (a command that works only on local files) otherwise."""
    if not isinstance(config.repository, Path):
        raise UsageError(
            f"{what} works on a local repository only, not on {config.repository}: "
            "copy the backups into a folder first (backupd copy --to PATH)"
        )
    return Repository(config.repository)


def open_location(location: Location, config: Config) -> Repository | S3Repository:
    """The root of the repository at ``location``, S3 ones with ``config``'s ``s3:``
    settings and its runtime and scratch folders."""
    if isinstance(location, Path):
        return Repository(location)
    from backupd.storage.s3repo import S3Repository

    return S3Repository(_storage(location, config.s3, config))


def _storage(location: S3Location, settings: S3Settings, config: Config) -> S3Storage:
    from backupd.storage.s3store import S3Storage

    name = (location.url, repr(settings))
    with _lock:
        storage = _open.get(name)
        if storage is None:
            runtime = runtime_base(config)
            storage = S3Storage(
                location,
                settings,
                runtime=private_dir(runtime, "runtime_dir"),
                scratch=config.scratch_dir,
            )
            _open[name] = storage
        return storage


def close_repositories() -> None:
    """Close every S3 repository opened (their uploads are over by then)."""
    with _lock:
        storages = list(_open.values())
        _open.clear()
    for storage in storages:
        storage.close()


atexit.register(close_repositories)

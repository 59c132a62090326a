"""Runs in progress in a bucket, and what a killed one left behind.

A run that writes a backup into a bucket first writes a *lease*,
``<vm>/<backup-id>/.lease`` (host, pid, what, since), renews it every
:data:`RENEW` seconds while it uploads, and removes it after the manifest (the commit).
What a killed run leaves - finished disk objects without a manifest, unfinished
multipart uploads (which cost storage and show in no listing), a stale lease - is
removed by the next run of that VM (:func:`leftovers`), but never what a run in
progress elsewhere is writing.  A folder's writer is taken to be gone when:

- its lease names this host: the next run holds the VM's host-local lock, so no run of
  this VM is writing from here (one host per VM and repository: see the README);
- its lease was last renewed more than :data:`TTL` ago (a run on another host that
  stopped renewing it);
- it has no lease and nothing in it is younger than :data:`TTL`.

Hosts' clocks must agree to within a few minutes (the lease's age is the server's
modification time against this host's clock; TTL is 15 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backupd.names import is_backup_id
from backupd.storage.vmrepo import MANIFEST, Leftover

if TYPE_CHECKING:
    from backupd.objectstore.client import ObjectStore
    from backupd.objectstore.objects import ObjectInfo, PendingUpload
    from backupd.storage.s3repo import S3VMRepository
    from backupd.storage.s3store import S3Storage

log = logging.getLogger("backupd.s3")

LEASE = ".lease"
#: a lease not renewed for this long belongs to a run that is gone
TTL = dt.timedelta(minutes=15)
#: seconds between renewals
RENEW = 300.0


def host_id() -> str:
    """This host, as leases name it: its name and the start of its machine id."""
    machine = ""
    with contextlib.suppress(OSError):
        machine = Path("/etc/machine-id").read_text().strip()[:12]
    return f"{socket.gethostname()}/{machine}"


class Lease:
    """The claim of one run on the folder ``key`` points into (on the bridge's loop)."""

    def __init__(self, storage: S3Storage, key: str, purpose: str) -> None:
        self.storage = storage
        self.key = key
        self.text = json.dumps(
            {
                "host": host_id(),
                "pid": os.getpid(),
                "purpose": purpose,
                "since": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()
        self._renewal: asyncio.Task[None] | None = None

    async def take(self) -> None:
        await self.storage.store.put(self.key, self.text)
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW)
            try:
                await self.storage.store.put(self.key, self.text)
            except Exception as exc:  # the upload that needs it fails on its own
                log.warning("could not renew the lease %s: %s", self.key, exc)

    async def drop(self, *, remove: bool = True) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        if remove:
            await self.storage.store.delete_many([self.key])


@dataclass
class _Folder:
    files: dict[str, ObjectInfo] = field(default_factory=dict)
    uploads: list[PendingUpload] = field(default_factory=list)


def leftovers(repo: S3VMRepository) -> list[Leftover]:
    """What killed runs left in ``repo``'s folders (the caller holds the VM's lock)."""
    return repo.storage.call(_find(repo))


async def _find(repo: S3VMRepository) -> list[Leftover]:
    store = repo.storage.store
    folders: dict[str, _Folder] = {}
    prefix = repo.folder_key
    async for info in store.list_objects(prefix):
        backup, _, name = info.key[len(prefix) :].partition("/")
        if is_backup_id(backup) and name and "/" not in name:
            folders.setdefault(backup, _Folder()).files[name] = info
    for upload in await store.pending_uploads(prefix):
        backup, _, name = upload.key[len(prefix) :].partition("/")
        if is_backup_id(backup):
            folders.setdefault(backup, _Folder()).uploads.append(upload)
    found: list[Leftover] = []
    for backup, folder in sorted(folders.items()):
        committed = MANIFEST in folder.files
        if committed and LEASE not in folder.files and not folder.uploads:
            continue
        holder = await _holder(store, folder)
        if holder is not None:
            log.info("%s: backup %s is being written by %s; left alone", repo.vm, backup, holder)
            continue
        keys = [LEASE] if committed else list(folder.files)
        found.append(_leftover(repo, backup, folder, keys, committed))
    return found


def _leftover(
    repo: S3VMRepository, backup: str, folder: _Folder, names: list[str], committed: bool
) -> Leftover:
    keys = [repo.key(backup, name) for name in names if name in folder.files]
    uploads = list(folder.uploads)
    what = "a stale lease of" if committed else "uncommitted"
    parts = [f"{len(keys)} objects"] + ([f"{len(uploads)} unfinished uploads"] if uploads else [])
    name = f"{what} backup {backup} ({', '.join(parts)})"

    async def remove() -> None:
        store = repo.storage.store
        for upload in uploads:
            await store.abort_multipart(upload.key, upload.upload_id)
        await store.delete_many(keys)

    return Leftover(name, lambda: repo.storage.call(remove()))


async def _holder(store: ObjectStore, folder: _Folder) -> str | None:
    """Who still writes the folder (None: nobody, it can go)."""
    now = dt.datetime.now(dt.UTC)
    lease = folder.files.get(LEASE)
    if lease is None:
        times = [i.last_modified for i in folder.files.values()]
        times += [u.initiated for u in folder.uploads]
        young = [t for t in times if now - t < TTL]
        return "a writer without a lease (less than 15 minutes ago)" if young else None
    try:
        data: Any = json.loads(await store.get(lease.key))
        host = str(data["host"])
        who = f"{data.get('purpose', 'a run')} (pid {data.get('pid')}) on {host}"
    except Exception:  # unreadable or gone: judge it by age alone
        host, who = "", "a run whose lease is unreadable"
    if host == host_id():
        return None  # this host's run of the VM is gone: we hold the VM's lock
    return who if now - lease.last_modified < TTL else None

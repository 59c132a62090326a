"""One S3 repository's connection: the client on its bridge loop, the shared read cache,
the NBD server that hands objects to qemu, and the host-local folders it needs.

Opened once per process and repository location (:mod:`backupd.storage.repositories`)
and closed when the command ends.  Nothing connects until the first request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from backupd.errors import ObjectNotFound, StorageUnsupported
from backupd.objectstore.settings import S3Settings
from backupd.private import private_dir
from backupd.storage.bridge import Bridge
from backupd.storage.location import S3Location

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from backupd.objectstore.client import ObjectStore
    from backupd.objectstore.objects import ObjectInfo
    from backupd.storage.objectnbd import ObjectNBDServer
    from backupd.storage.s3image import BlockCache

log = logging.getLogger("backupd.s3")
T = TypeVar("T")

#: HTTP connections (so requests in flight) of one repository
CONNECTIONS = 16


class S3Storage:
    """``S3Storage(location, settings, runtime=..., scratch=...)``: ``runtime`` holds
    the locks and the NBD socket, ``scratch`` the checked metadata copies (both local
    folders only backupd's user may write)."""

    def __init__(
        self, location: S3Location, settings: S3Settings, *, runtime: Path, scratch: Path
    ) -> None:
        self.location = location
        self.settings = settings
        self.runtime = runtime
        self.scratch = scratch
        self.bridge = Bridge(f"s3 {location.url}", self._connect, self._close)
        self._store: ObjectStore | None = None
        self._cache: BlockCache | None = None
        self._nbd: ObjectNBDServer | None = None
        #: None until a conditional PUT was tried
        self.conditional_put: bool | None = None

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def identity(self) -> str:
        """A short name of this repository for host-local files (locks)."""
        where = (
            f"{self.settings.endpoint_url or 'aws'}|{self.location.bucket}|{self.location.prefix}"
        )
        return hashlib.sha256(where.encode()).hexdigest()[:16]

    # -- the client, on the bridge's loop ---------------------------------------------

    async def _connect(self) -> None:
        from backupd.objectstore.client import ObjectStore
        from backupd.storage.s3image import BlockCache

        self._store = await ObjectStore(
            self.settings, self.location.bucket, max_connections=CONNECTIONS
        ).connect()
        self._cache = BlockCache(self._store)

    async def _close(self) -> None:
        if self._nbd is not None:
            await self._nbd.close()
            self._nbd = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    def start(self) -> S3Storage:
        self.bridge.start()
        return self

    def close(self) -> None:
        self.bridge.stop()

    @property
    def store(self) -> ObjectStore:
        """The client (use it on the bridge's loop only)."""
        if self._store is None:
            self.start()
        assert self._store is not None
        return self._store

    @property
    def cache(self) -> BlockCache:
        self.store  # noqa: B018 (connects first)
        assert self._cache is not None
        return self._cache

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge's loop, synchronously."""
        self.store  # noqa: B018
        return self.bridge.call(coro)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` run on the bridge's loop."""
        self.store  # noqa: B018
        return await self.bridge.run(coro)

    # -- small objects, synchronously ---------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The object ``key``, or None when it does not exist."""

        async def get() -> bytes | None:
            try:
                return await self.store.get(key)
            except ObjectNotFound:
                return None

        return self.call(get())

    def head(self, key: str) -> ObjectInfo | None:
        async def head() -> ObjectInfo | None:
            try:
                return await self.store.head(key)
            except ObjectNotFound:
                return None

        return self.call(head())

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Store ``data`` as ``key``; ``if_absent`` where the server can refuse to
        replace an object (else the caller checked before: one host per VM)."""
        self.call(self.put_async(key, data, if_absent=if_absent))

    async def put_async(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        store = self.store
        if if_absent and self.conditional_put is not False:
            try:
                await store.put(key, data, if_absent=True)
                self.conditional_put = True
                return
            except StorageUnsupported:
                log.debug("%s: no conditional PUT (If-None-Match); one host per VM", self.url)
                self.conditional_put = False
        await store.put(key, data)

    def delete(self, keys: list[str]) -> None:
        if keys:
            self.call(self.store.delete_many(keys))

    def listing(self, folder: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``folder``, in key order."""

        async def listing() -> list[ObjectInfo]:
            return [info async for info in self.store.list_objects(folder)]

        return self.call(listing())

    # -- what qemu and the gate need ------------------------------------------------------

    def shadow_file(self) -> int:
        """A new unnamed file in the scratch folder (checked metadata of an object)."""
        folder = private_dir(self.scratch, "scratch_dir")
        try:
            return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (OSError, AttributeError):
            fd, name = tempfile.mkstemp(prefix=".gate-", dir=folder)
            os.unlink(name)
            return fd

    async def nbd_server(self) -> ObjectNBDServer:
        """The NBD server of this repository's objects (started on first use; on the
        bridge's loop)."""
        if self._nbd is None:
            from backupd.storage.objectnbd import ObjectNBDServer

            folder = Path(tempfile.mkdtemp(prefix="s3nbd-", dir=self.runtime))
            self._nbd = await ObjectNBDServer(folder / "nbd.sock").start()
        return self._nbd

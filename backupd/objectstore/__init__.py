"""Object storage (S3 and compatible servers: AWS, Ceph RGW, MinIO, OpenStack Swift...)
for backupd: settings, an asyncio client for one bucket with exactly the requests a
repository needs, and a writer that streams a file into a multipart upload.

Modules: :mod:`.settings` (the ``s3:`` settings), :mod:`.client` (the requests),
:mod:`.objects` (the values they answer with), :mod:`.body` (request bodies sent without
a copy), :mod:`.retry` (bounded retries with backoff), :mod:`.failures` (errors judged
and mapped to :class:`~backupd.errors.StorageError`), :mod:`.writer` (the multipart
sink).

The names below are imported when first used: the configuration reads
:mod:`.settings` for every command, and a local repository never pays for importing
aiobotocore (about 0.3 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backupd.objectstore.client import ObjectStore
    from backupd.objectstore.objects import (
        MAX_PARTS,
        MIN_PART,
        ConditionalPut,
        ObjectInfo,
        PendingUpload,
    )
    from backupd.objectstore.retry import Backoff
    from backupd.objectstore.settings import S3Settings
    from backupd.objectstore.writer import DEFAULT_PART_SIZE, MultipartWriter

_WHERE = {
    "DEFAULT_PART_SIZE": "writer",
    "MAX_PARTS": "objects",
    "MIN_PART": "objects",
    "Backoff": "retry",
    "ConditionalPut": "objects",
    "MultipartWriter": "writer",
    "ObjectInfo": "objects",
    "ObjectStore": "client",
    "PendingUpload": "objects",
    "S3Settings": "settings",
}

__all__ = [
    "DEFAULT_PART_SIZE",
    "MAX_PARTS",
    "MIN_PART",
    "Backoff",
    "ConditionalPut",
    "MultipartWriter",
    "ObjectInfo",
    "ObjectStore",
    "PendingUpload",
    "S3Settings",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

"""Object storage (S3 and compatible servers: AWS, Ceph RGW, MinIO, OpenStack Swift...)
for backupd: settings, an asyncio client for one bucket with exactly the requests a
repository needs, and a writer that streams a file into a multipart upload.

Modules: :mod:`.settings` (the ``s3:`` settings), :mod:`.client` (the requests),
:mod:`.objects` (the values they answer with), :mod:`.body` (request bodies sent without
a copy), :mod:`.retry` (bounded retries with backoff), :mod:`.failures` (errors judged
and mapped to :class:`~backupd.errors.StorageError`), :mod:`.writer` (the multipart
sink).
"""

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

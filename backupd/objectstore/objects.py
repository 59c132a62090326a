"""What an object store holds and answers, as values: objects, pending multipart
uploads, what a server can do, and S3's limits."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

Buffer = bytes | bytearray | memoryview
MAX_PARTS = 10000  # parts of one multipart upload (S3's limit)
MIN_PART = 5 << 20  # bytes of every part but the last (S3's rule)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # without quotes; "<md5 of part md5s>-<parts>" for a multipart object
    last_modified: datetime
    #: user metadata (``x-amz-meta-*``), as HEAD answers it (listings carry none)
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """A multipart upload begun and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime


class ConditionalPut(enum.Enum):
    """Whether ``PUT`` with ``If-None-Match: *`` (create only if absent) works."""

    SUPPORTED = "supported"
    UNSUPPORTED = "unsupported"  # refused (e.g. Swift: 501)
    IGNORED = "ignored"  # accepted but not enforced: the second PUT also succeeded

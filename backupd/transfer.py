"""Backing up one disk: its export mapped, the clusters to store planned, and the copy
engine (:mod:`nbdclient.copy`) filling a new qcow2 file through :class:`Qcow2Sink`,
with a digest of every stored run.

The export is mapped with ``base:allocation`` (and the dirty-bitmap context for an
incremental) and turned into cluster runs: *data* runs are read and stored, *zero* runs
become qcow2 zero clusters (an incremental must hide older data), everything else is
left out (a full does not store zeros; an incremental falls through to its backing
file).  How the engine reads (512 KiB requests, batches of consecutive reads in one
buffer of the run's pool, one write per batch in a thread with its hashing) is said in
:mod:`nbdclient.copy.engine`; the buffers are shared by the disks of a run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backupd.config import Transfer
from backupd.faults import checkpoint, hang_point
from backupd.manifest import DiskRecord
from backupd.qcow2.layout import CLUSTER_SIZE
from nbdclient.copy import WRITE_BATCH, BufferPool, Plan, Source, copy
from nbdclient.copy.plan import Interval, blocks_touched, intersect, subtract
from nbdclient.extents import MappedExtent

if TYPE_CHECKING:
    from backupd.qcow2.encryption import KeySpec
    from backupd.storage.vmrepo import Staged


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """Cluster intervals ``[start, end)`` to read, and to record as zero."""

    data: list[Interval]
    zero: list[Interval]

    @property
    def data_clusters(self) -> int:
        return sum(e - s for s, e in self.data)


def plan_clusters(
    extents: Sequence[MappedExtent], *, incremental: bool, cluster: int = CLUSTER_SIZE
) -> CopyPlan:
    """Which clusters to read and which to record as zero.

    A cluster is data when any part of it may hold non-zero bytes; it is zero only when
    all of it reads as zero (a partly zero cluster is read whole).  For an incremental
    only dirty clusters count; for a full, zero clusters are simply not stored.
    """
    nonzero = blocks_touched(extents, lambda e: not e.zero, cluster)
    if not incremental:
        return CopyPlan(nonzero, [])
    dirty = blocks_touched(extents, lambda e: e.dirty, cluster)
    return CopyPlan(intersect(dirty, nonzero), subtract(dirty, nonzero))


def buffer_size(settings: Transfer) -> int:
    """Bytes per buffer: one read, or one batch of reads written at once."""
    return max(settings.request_size // CLUSTER_SIZE * CLUSTER_SIZE, CLUSTER_SIZE, WRITE_BATCH)


def run_pool(settings: Transfer, batches: int | None = None) -> BufferPool:
    """The buffers of one run: one per batch in flight of a disk, twice over for runs of
    several disks (their copies share the host's disk and CPU anyway); or ``batches``."""
    count = batches if batches is not None else 2 * max(1, settings.requests)
    return BufferPool(buffer_size(settings), count)


async def _fault_points(reads: int) -> None:
    checkpoint("mid-copy", hits=reads)  # fault points count reads, not batches
    await hang_point("mid-copy")


async def transfer_disk(
    *,
    name: str,
    node: str,
    uri: str,
    dirty_context: str | None,
    staging: Staged,
    backing_file: str | None,
    settings: Transfer,
    disks: int = 1,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    timeout: float = 10.0,
    request_timeout: float = 300.0,
    pool: BufferPool | None = None,
    encryption: KeySpec | None = None,
) -> DiskRecord:
    """Copy one exported disk into a new qcow2 image of ``staging`` (removed again on
    any error); ``pool`` gives the buffers (shared by the ``disks`` of a run), else the
    disk gets its own; ``encryption``: the image is LUKS-encrypted (a master key of its
    own)."""
    started = time.monotonic()
    # PBKDF2 of the new key slot: in a thread, while the other disks go on
    image_key = None
    if encryption is not None:
        from backupd.qcow2.encryption import ImageKey

        image_key = await asyncio.to_thread(ImageKey.new, encryption)
    async with await Source.open(
        uri, dirty_context=dirty_context, timeout=timeout, request_timeout=request_timeout
    ) as source:
        size = source.size
        clusters = plan_clusters(await source.map(), incremental=dirty_context is not None)
        plan = Plan.from_blocks(clusters.data, clusters.zero, CLUSTER_SIZE, size)
        if on_total is not None:
            on_total(plan.read_bytes)
        sink = staging.sink(
            name,
            size,
            backing_file=backing_file,
            compress=settings.compress,
            expected=plan.read_bytes,
            disks=disks,
            encryption=image_key,
        )
        stats = await copy(
            source,
            plan,
            sink,
            pool=pool or run_pool(settings),
            requests=settings.requests,
            request_size=settings.request_size,
            connections=settings.connections,
            progress=progress,
            on_batch=_fault_points,
        )
        seconds = time.monotonic() - started
    return DiskRecord(
        name=name,
        file=f"{name}.qcow2",
        node=node,
        virtual_size=size,
        cluster_size=CLUSTER_SIZE,
        bytes_copied=stats.bytes_read,
        bytes_stored=sink.stored,
        data_extents=len(clusters.data),
        zero_extents=len(clusters.zero),
        compressed=settings.compress,
        digests=tuple(sorted(sink.digests, key=lambda d: d.guest_offset)),
        digest_algorithm=sink.digest_algorithm,
        copy_seconds=round(seconds, 4),
        encrypted=image_key is not None,
    )

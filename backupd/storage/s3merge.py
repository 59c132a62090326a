"""A merge (prune) in a bucket: the kept backup's images are written anew.

On a local disk ``qemu-img commit``/``rebase`` change qcow2 files in place, at the cost
of the merged data.  An object cannot be changed in place, so here a fold *rewrites*
each image of the kept backup, as a new upload of the same key, read from the point in
time it shows (served by qemu-storage-daemon from the pinned, gate-checked chain, as
``restore`` reads it):

- *down* (the folded F..Bk-1 into the kept Bk): Bk becomes a full: every allocated
  cluster of Bk's point is written (download and upload of the whole point, not of the
  merged data alone);
- *up* (the folded Ka+1..Kb-1 between the kept Ka and Kb): Kb stays an incremental,
  now on Ka, holding every cluster Kb or a folded backup held, read from Kb's point
  (zeros as zero clusters, so Ka's data stays hidden where it must).

The merge journal (``.merge.json``) is the local one's.  A rewrite completes its upload
only after every read (the old object is read pinned, so the new one cannot be mixed
in), and an image is replaced atomically; its manifest (``manifest.json.new``, then put
in place by the exchange) follows, so between the two the gate refuses the image
(its backing name no longer matches the old manifest): never wrong data.  A resumed
fold finds an image already rewritten by its backing name and reads the point from
it (the same point, stored the new way), so every step may be done again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from pathlib import Path

from backupd.chain import CheckedFile, check_image, image_name
from backupd.config import Transfer
from backupd.errors import ChainError, NotFoundError, RepositoryError
from backupd.faults import checkpoint
from backupd.keys import Key
from backupd.manifest import DiskRecord, Kind, Manifest
from backupd.merge.fold import FoldResult, check_fold
from backupd.merge.plan import Direction, Fold
from backupd.qcow2.layout import CLUSTER_SIZE
from backupd.qcow2.mapping import ClusterMap
from backupd.qcow2.sink import Qcow2Sink
from backupd.qcow2.writer import Qcow2Writer
from backupd.serving import ServedImage
from backupd.storage.s3image import ObjectImage
from backupd.storage.s3repo import S3VMRepository
from backupd.storage.s3stage import UploadTarget, multipart, part_layout
from backupd.storage.vmrepo import MANIFEST, VMRepo
from backupd.transfer import plan_clusters, run_pool
from nbdclient import NBDError
from nbdclient.copy import Plan, Source, copy
from nbdclient.copy.plan import Interval, blocks_touched, intersect, subtract

log = logging.getLogger("backupd.merge")

NEW_MANIFEST = MANIFEST + ".new"


def _s3(repo: VMRepo) -> S3VMRepository:
    assert isinstance(repo, S3VMRepository)
    return repo


def _held(files: list[CheckedFile]) -> set[int]:
    """The guest clusters the files hold themselves (data, zero or compressed)."""
    held: set[int] = set()
    for checked in files:
        assert isinstance(checked.image, ObjectImage)
        held |= {cluster.index for cluster in ClusterMap(checked.image).held()}
    return held


def _intervals(clusters: set[int]) -> list[Interval]:
    runs: list[Interval] = []
    for index in sorted(clusters):
        if runs and runs[-1][1] == index * CLUSTER_SIZE:
            runs[-1] = (runs[-1][0], (index + 1) * CLUSTER_SIZE)
        else:
            runs.append((index * CLUSTER_SIZE, (index + 1) * CLUSTER_SIZE))
    return runs


class _Steps:
    def check_fold(self, repo: VMRepo, what: Fold, key: Key | None = None) -> None:
        check_fold(repo, what, key)  # the gate and the key, as on a local disk

    async def fold(
        self, repo: VMRepo, what: Fold, resumed: bool = False, key: Key | None = None
    ) -> FoldResult:
        s3 = _s3(repo)
        started = dt.datetime.now(dt.UTC)
        target = repo.load(what.target)
        parent = repo.load(what.parent) if what.parent is not None else None
        disks: dict[str, DiskRecord] = {}
        merged = 0
        for disk in sorted(target.disks):
            record, held = await _rewrite(s3, what, target, parent, disk, key)
            disks[disk] = record
            merged += held
            checkpoint("merge-after-qemu-img")
        if what.direction is Direction.DOWN:
            manifest = dataclasses.replace(target, kind=Kind.FULL, parent=None, disks=disks)
        else:
            manifest = dataclasses.replace(target, parent=what.parent, disks=disks)
        day = started.strftime("%Y-%m-%d")
        folded = what.folded[0] if len(what.folded) == 1 else f"{what.folded[0]}..{what.folded[-1]}"
        manifest = dataclasses.replace(
            manifest, reason=f"{target.reason}; {folded} merged in on {day} (rewritten)"
        )
        s3.storage.put(s3.key(target.id, NEW_MANIFEST), manifest.to_json().encode())
        seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
        return FoldResult(manifest, merged, seconds)

    def exchange(self, repo: VMRepo, what: Fold) -> None:
        s3 = _s3(repo)
        raw = s3.storage.get(s3.key(what.target, NEW_MANIFEST))
        if raw is None:
            return  # done before
        checkpoint("merge-before-manifest")
        s3.storage.put(s3.key(what.target, MANIFEST), raw)
        s3.storage.delete([s3.key(what.target, NEW_MANIFEST)])

    def remove(self, repo: VMRepo, backup: str) -> None:
        """The manifest first (the backup is gone from then on), then its images."""
        s3 = _s3(repo)
        files = s3.scan().backups.get(backup, {})
        keys = [s3.key(backup, name) for name in files if name != MANIFEST]
        s3.storage.delete([s3.key(backup, MANIFEST)])
        s3.storage.delete(keys)


STEPS = _Steps()


def _chain_files(
    repo: VMRepo, upto: Manifest, disk: str, encrypted: bool = False
) -> list[CheckedFile]:
    """Every file of ``disk`` from the full to ``upto``, checked (the caller closes them)."""
    chain: list[CheckedFile] = []
    previous: Manifest | None = None
    try:
        for manifest in repo.chain(upto.id):
            chain.append(check_image(repo, manifest, disk, previous, allow_encryption=encrypted))
            previous = manifest
    except BaseException:
        for checked in chain:
            checked.image.close()
        raise
    return chain


def _checked(
    repo: S3VMRepository,
    target: Manifest,
    parent: Manifest | None,
    disk: str,
    encrypted: bool = False,
) -> tuple[list[CheckedFile], bool]:
    """The files that show the target's point of ``disk``: its chain as stored, or (when a
    resumed fold rewrote it already: it names its new parent) the new image on the
    parent's chain; and whether it was rewritten."""
    old = None if target.parent is None else f"../{target.parent}/{image_name(disk)}"
    new = None if parent is None else f"../{parent.id}/{image_name(disk)}"
    if new != old:
        try:
            top = check_image(repo, target, disk, parent, allow_encryption=encrypted)
        except ChainError:
            top = None  # not rewritten yet
        if top is not None:
            try:
                below = _chain_files(repo, parent, disk, encrypted) if parent else []
            except BaseException:
                top.image.close()
                raise
            return [*below, top], True
    return _chain_files(repo, target, disk, encrypted), False


async def _rewrite(
    repo: S3VMRepository,
    what: Fold,
    target: Manifest,
    parent: Manifest | None,
    disk: str,
    key: Key | None = None,
) -> tuple[DiskRecord, int]:
    """Write the target's image of ``disk`` anew (see the module docstring; encrypted
    with a master key of its own under ``key`` when the VM's backups are); returns its
    record and the bytes the folded backups held."""
    files, rewritten = _checked(repo, target, parent, disk, key is not None)
    try:
        cluster = target.disks[disk].cluster_size
        if what.direction is Direction.DOWN:
            keep: set[int] | None = None
            held = _held([f for f in files if f.backup in what.folded])
        else:
            own = [f for f in files if f.backup in (*what.folded, target.id)]
            keep = _held(own if not rewritten else files[-1:])
            held = _held([f for f in files if f.backup in what.folded])
        served = ServedImage(repo, target, [disk], chains={disk: files}, key=key)
        async with served as (image,):
            record = await _copy_point(repo, target, disk, image.uri, parent, keep, key)
    finally:
        for checked in files:
            checked.image.close()
    return record, len(held) * cluster


async def _copy_point(
    repo: S3VMRepository,
    target: Manifest,
    disk: str,
    uri: str,
    parent: Manifest | None,
    keep: set[int] | None,
    key: Key | None = None,
) -> DiskRecord:
    """The point served at ``uri`` into a new upload of the target's image: every
    allocated cluster (``keep`` None: a full), or the clusters ``keep`` names, on
    ``parent``."""
    settings = Transfer()
    object_key = repo.key(target.id, image_name(disk))
    backing = None if parent is None else f"../{parent.id}/{image_name(disk)}"
    image_key, region = None, b""
    if key is not None:
        from backupd.qcow2.encryption import ImageKey

        spec = await asyncio.to_thread(key.spec)
        image_key, region = await asyncio.to_thread(ImageKey.new, spec)
    try:
        async with await Source.open(uri) as source:
            size = source.size
            extents = await source.map()
            if keep is None:
                clusters = plan_clusters(extents, incremental=False)
                data, zero = clusters.data, []
            else:
                nonzero = blocks_touched(extents, lambda e: not e.zero, CLUSTER_SIZE)
                wanted = _intervals(keep)
                data, zero = intersect(wanted, nonzero), subtract(wanted, nonzero)
            plan = Plan.from_blocks(data, zero, CLUSTER_SIZE, size)
            writer = Qcow2Writer(
                Path(object_key),
                size,
                cluster_size=CLUSTER_SIZE,
                backing_file=backing,
                luks_region=region,
            )
            layout = part_layout(plan.read_bytes)
            upload = UploadTarget(
                repo.storage, multipart(repo.storage, object_key, layout), plan.read_bytes
            )
            sink = Qcow2Sink(writer, target=upload, digests=True, key=image_key)
            await copy(source, plan, sink, pool=run_pool(settings), connections=4)
    except NBDError as exc:
        raise RepositoryError(f"merging backup {target.id}, disk {disk}: {exc}") from exc
    if sink.stats is None:
        raise NotFoundError(f"merging backup {target.id}, disk {disk}: nothing written")
    old = target.disks[disk]
    return dataclasses.replace(
        old,
        bytes_stored=sink.stored,
        data_extents=len(data),
        zero_extents=len(zero),
        compressed=False,
        digests=tuple(sorted(sink.digests, key=lambda d: d.guest_offset)),
        digest_algorithm=sink.digest_algorithm,
        encrypted=image_key is not None,
    )

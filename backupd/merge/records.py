"""A kept backup's disk record after a fold: digests that stay true without re-reading
what the fold did not touch.

Down (the full's file becomes the kept backup's): the full's digest runs whose clusters
the folded backups did not hold are still exact (qemu-img commit never moves a cluster
and wrote none of them); the clusters they held are hashed anew where they now lie.
Up (the kept backup's own file gains what it needed of the folded ones): every one of
its runs is still exact (qemu-img rebase writes only clusters the file did not hold);
the clusters it gained are hashed.  Either way the bytes read are about the bytes merged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from backupd.digests import hasher
from backupd.manifest import DigestRun, DiskRecord
from backupd.qcow2 import layout
from backupd.qcow2.inspector import OFFSET_MASK
from backupd.qcow2.mapping import Cluster, ClusterMap, Kind

if TYPE_CHECKING:
    from backupd.qcow2.encryption import ImageKey

#: new runs are hashed in pieces of at most this size
RUN = 4 << 20


def _guest_clusters(run: DigestRun, cluster_size: int) -> range:
    first = run.guest_offset // cluster_size
    return range(first, max(first + 1, -(-(run.guest_offset + run.length) // cluster_size)))


def _still_exact(run: DigestRun, mapping: ClusterMap, touched: set[int]) -> bool:
    """The run's clusters were not written, and still lie where the run says."""
    size = mapping.cluster_size
    clusters = _guest_clusters(run, size)
    if not touched.isdisjoint(clusters):
        return False
    first = mapping.entry(clusters[0])
    if first & layout.OFLAG_COMPRESSED:
        return len(clusters) == 1
    host = run.host_offset
    return all(
        mapping.entry(c) & (OFFSET_MASK | layout.OFLAG_COMPRESSED) == host + i * size
        for i, c in enumerate(clusters)
    )


def _hash(fd: int, offset: int, length: int, algorithm: str, key: ImageKey | None) -> str:
    """The digest of ``length`` stored bytes at ``offset`` (of their plaintext, keyed,
    in an encrypted file: whole sectors are read and decrypted)."""
    digest = hasher(algorithm, key.digest_key if key is not None else None)
    done = 0
    while done < length:
        want = min(RUN, length - done)
        piece = os.pread(fd, want if key is None else -(-want // 512) * 512, offset + done)
        if len(piece) < want:
            raise OSError(f"short read at {offset + done}")
        if key is not None:
            sectors = bytearray(piece)
            key.cipher.decrypt(sectors, offset + done)
            piece = bytes(sectors[:want])
        digest.update(piece)
        done += len(piece)
    return digest.hexdigest()


def _new_runs(
    mapping: ClusterMap, clusters: Iterable[Cluster], algorithm: str, key: ImageKey | None
) -> list[DigestRun]:
    """Runs over ``clusters`` as they lie in the file: data clusters adjacent in the guest
    and on the host form one run (at most :data:`RUN`), a compressed one its own run."""
    size, virtual = mapping.cluster_size, mapping.virtual_size
    spans: list[tuple[int, int, int]] = []  # host, length, guest
    for cluster in sorted(clusters, key=lambda c: c.index):
        guest = cluster.index * size
        if cluster.kind is Kind.COMPRESSED:  # the sectors its entry names
            start, end = layout.compressed_span(mapping.cluster_bits, mapping.entry(cluster.index))
            spans.append((start, end - start, guest))
            continue
        if cluster.kind is not Kind.DATA:
            continue
        length = min(size, virtual - guest)
        host, last_length, last_guest = spans[-1] if spans else (0, 0, -1)
        if (
            spans
            and last_guest + last_length == guest
            and host + last_length == cluster.host
            and last_length % size == 0
            and last_length + length <= RUN
            and not mapping.entry(last_guest // size) & layout.OFLAG_COMPRESSED
        ):
            spans[-1] = (host, last_length + length, last_guest)
        else:
            spans.append((cluster.host, length, guest))
    assert isinstance(mapping.fd, int)  # a local file (merges in a bucket rewrite instead)
    return [
        DigestRun(host, length, guest, _hash(mapping.fd, host, length, algorithm, key))
        for host, length, guest in spans
    ]


def _record(base: DiskRecord, target: DiskRecord, runs: list[DigestRun]) -> DiskRecord:
    runs.sort(key=lambda r: r.guest_offset)
    return dataclasses.replace(
        target,
        digests=tuple(runs),
        digest_algorithm=base.digest_algorithm,
        encrypted=base.encrypted,
        bytes_stored=sum(r.length for r in runs),
        data_extents=len(runs),
        compressed=base.compressed or target.compressed,
    )


def after_down(
    fd: int, full: DiskRecord, target: DiskRecord, touched: set[int], key: ImageKey | None = None
) -> DiskRecord:
    """The record of the full's file, now holding ``target``'s point, after the folded
    backups' clusters ``touched`` were committed into it (``key``: the file's key, when
    it is encrypted; its digests stay keyed with it)."""
    mapping = ClusterMap(fd)
    kept = [run for run in full.digests if _still_exact(run, mapping, touched)]
    touched_clusters = (mapping.lookup(c) for c in touched)
    fresh = _new_runs(mapping, touched_clusters, full.digest_algorithm, key)
    return _record(full, target, kept + fresh)


def after_up(fd: int, target: DiskRecord, key: ImageKey | None = None) -> DiskRecord:
    """The record of ``target``'s file after it gained what the folded backups held."""
    mapping = ClusterMap(fd)
    kept = [run for run in target.digests if _still_exact(run, mapping, set())]
    covered = {c for run in kept for c in _guest_clusters(run, mapping.cluster_size)}
    gained = [c for c in mapping.held() if c.index not in covered]
    fresh = _new_runs(mapping, gained, target.digest_algorithm, key)
    return _record(target, target, kept + fresh)


def held_clusters(fd: int) -> set[int]:
    """The guest clusters a file holds itself (data, zero or compressed)."""
    return {cluster.index for cluster in ClusterMap(fd).held()}

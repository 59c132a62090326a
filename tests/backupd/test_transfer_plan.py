"""Which clusters a backup reads, records as zero, or leaves out."""

from __future__ import annotations

from backupd.transfer import CopyPlan, plan_clusters
from nbdclient.extents import MappedExtent

C = 65536


def ext(offset: int, length: int, *, zero: bool = False, dirty: bool = True) -> MappedExtent:
    return MappedExtent(offset, length, zero, zero, dirty)


def test_full_reads_clusters_touched_by_data() -> None:
    extents = [
        ext(0, 4096),
        ext(4096, 3 * C - 4096, zero=True),
        ext(3 * C, C + 512),
        ext(4 * C + 512, 4 * C - 512, zero=True),
    ]
    assert plan_clusters(extents, incremental=False) == CopyPlan([(0, 1), (3, 5)], [])


def test_incremental_dirty_zero_and_partial_clusters() -> None:
    extents = [
        ext(0, C, dirty=False),  # clean data: falls through
        ext(C, C, zero=True),  # dirty zero: zero cluster
        ext(2 * C, 512, zero=True),  # dirty, but the cluster also holds data
        ext(2 * C + 512, C - 512, dirty=False),
        ext(3 * C, 2 * C),  # dirty data
        ext(5 * C, C, zero=True, dirty=False),  # clean zero: nothing
    ]
    plan = plan_clusters(extents, incremental=True)
    assert plan.data == [(2, 5)]
    assert plan.zero == [(1, 2)]

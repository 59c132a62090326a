"""Copy plans: byte ranges from a map, block intervals and their set operations."""

from __future__ import annotations

from nbdclient.copy.plan import Plan, blocks_touched, intersect, subtract
from nbdclient.extents import MappedExtent


def ext(offset: int, length: int, *, zero: bool = False) -> MappedExtent:
    return MappedExtent(offset, length, zero, zero, True)


def test_interval_helpers() -> None:
    assert intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert subtract([(0, 10), (20, 30)], [(2, 4), (8, 22), (29, 40)]) == [(0, 2), (4, 8), (22, 29)]


def test_from_extents_merges_neighbours_and_keeps_zeros_apart() -> None:
    extents = [ext(0, 512), ext(512, 512), ext(1024, 3072, zero=True), ext(4096, 100)]
    plan = Plan.from_extents(extents)
    assert plan.reads == [(0, 1024), (4096, 4196)] and plan.zeros == [(1024, 4096)]
    assert (plan.read_bytes, plan.zero_bytes) == (1124, 3072)
    assert Plan.from_extents(extents, sparse=False).reads == [(0, 4196)]


def test_from_blocks_cuts_the_last_block_at_the_size() -> None:
    extents = [ext(0, 100), ext(100, 8000, zero=True), ext(8100, 92)]
    blocks = blocks_touched(extents, lambda e: not e.zero, 4096)
    assert blocks == [(0, 2)]  # touching intervals merge
    plan = Plan.from_blocks([(0, 1), (1, 3)], [(5, 9)], 4096, 8192 + 50)
    assert plan.reads == [(0, 4096), (4096, 8242)] and plan.zeros == []

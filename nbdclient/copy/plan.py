"""What a copy reads and what it zeroes, worked out from an export's map.

A :class:`Plan` is two lists of byte ranges ``[start, end)`` of the source, increasing
and disjoint: *reads* (copied), and *zeros* (the sink makes them read as zero; a sink
that starts out zero may ignore them).  Everything else is left alone.  Sinks that
store whole blocks (a qcow2 cluster) get plans built from block intervals with
:func:`blocks_touched`, :func:`intersect` and :func:`subtract`, and converted with
:meth:`Plan.from_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..extents import MappedExtent

Interval = tuple[int, int]  # [start, end)


def _merge(ranges: list[Interval], start: int, end: int) -> None:
    if ranges and start <= ranges[-1][1]:
        ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
    else:
        ranges.append((start, end))


@dataclass(frozen=True, slots=True)
class Plan:
    reads: Sequence[Interval]
    zeros: Sequence[Interval] = ()

    @property
    def read_bytes(self) -> int:
        return sum(end - start for start, end in self.reads)

    @property
    def zero_bytes(self) -> int:
        return sum(end - start for start, end in self.zeros)

    @classmethod
    def from_extents(cls, extents: Sequence[MappedExtent], *, sparse: bool = True) -> Plan:
        """Read what may hold data, zero what reads as zero (``sparse``), or read all."""
        reads: list[Interval] = []
        zeros: list[Interval] = []
        for e in extents:
            _merge(zeros if sparse and e.zero else reads, e.offset, e.end)
        return cls(reads, zeros)

    @classmethod
    def from_blocks(
        cls, reads: Sequence[Interval], zeros: Sequence[Interval], block: int, size: int
    ) -> Plan:
        """Block intervals as byte ranges, the last block cut at ``size``."""

        def scale(intervals: Sequence[Interval]) -> list[Interval]:
            return [(s * block, min(e * block, size)) for s, e in intervals if s * block < size]

        return cls(scale(reads), scale(zeros))


def blocks_touched(
    extents: Sequence[MappedExtent], keep: Callable[[MappedExtent], bool], block: int
) -> list[Interval]:
    """Blocks touched by any extent that ``keep`` selects, as merged intervals."""
    out: list[Interval] = []
    for e in extents:
        if keep(e):
            _merge(out, e.offset // block, -(-e.end // block))
    return out


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    j = 0
    for start, end in a:
        position = start
        while j < len(b) and b[j][1] <= position:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > position:
                out.append((position, b[k][0]))
            position = max(position, b[k][1])
            k += 1
        if position < end:
            out.append((position, end))
    return out

"""Extent helpers: walk an export's block status in bounded requests, merge
``base:allocation`` with a ``qemu:dirty-bitmap:NAME`` context into one extent list, and
map what changed without mapping the whole disk's allocation (:func:`map_dirty_first`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from .client import Client
from .constants import BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO
from .errors import RemoteProtocolError, UnsupportedError
from .values import Extent

DEFAULT_WINDOW = 1 << 30


@dataclass(frozen=True, slots=True)
class MappedExtent:
    """A range of the export: whether it reads as zero, is a hole, and is dirty."""

    offset: int
    length: int
    zero: bool
    hole: bool
    dirty: bool

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def data(self) -> bool:
        """True when the range holds data that must be read (not known to be zero)."""
        return not self.zero


def _require(client: Client, context: str) -> None:
    if context not in client.meta_contexts:
        raise UnsupportedError(f"meta context {context!r} was not negotiated with the server")


async def iter_block_status(
    client: Client,
    context: str = BASE_ALLOCATION,
    *,
    offset: int = 0,
    length: int | None = None,
    window: int = DEFAULT_WINDOW,
) -> AsyncIterator[Extent]:
    """Every extent of ``context`` over ``[offset, offset + length)``, in order."""
    _require(client, context)
    end = client.size if length is None else min(client.size, offset + length)
    position = offset
    while position < end:
        reply = await client.block_status(min(window, end - position), position)
        extents = reply.get(context)
        if not extents:
            raise RemoteProtocolError(f"block status reply without extents for {context}")
        for extent in extents:
            yield extent
        position = extents[-1].end


def merge_extents(
    allocation: Sequence[Extent], dirty: Sequence[Extent] | None
) -> list[MappedExtent]:
    """Combine allocation extents with dirty extents (everything dirty when None).

    Both lists must be contiguous and start at the same offset; the result covers
    the shorter of the two.  Adjacent ranges with the same state are coalesced.
    """
    if not allocation or (dirty is not None and not dirty):
        return []
    start = allocation[0].offset
    if dirty is None:  # everything dirty: one dirty extent over the whole span
        last = allocation[-1]
        dirty = [Extent(start, last.offset + last.length - start, STATE_DIRTY)]
    elif dirty[0].offset != start:
        raise ValueError("allocation and dirty extents start at different offsets")
    # the run being built: [run_start, position) with one state; a MappedExtent is made
    # only when the state changes (a map of 10,000 extents costs milliseconds)
    result: list[MappedExtent] = []
    run_start = position = start
    state: tuple[bool, bool, bool] | None = None
    i = j = 0
    count_a, count_d = len(allocation), len(dirty)
    while i < count_a and j < count_d:
        a, d = allocation[i], dirty[j]
        a_end, d_end = a.offset + a.length, d.offset + d.length
        end = a_end if a_end < d_end else d_end
        new = (bool(a.flags & STATE_ZERO), bool(a.flags & STATE_HOLE), bool(d.flags & STATE_DIRTY))
        if new != state:
            if state is not None:
                result.append(MappedExtent(run_start, position - run_start, *state))
            state, run_start = new, position
        position = end
        if a_end == end:
            i += 1
        if d_end == end:
            j += 1
    if state is not None:
        result.append(MappedExtent(run_start, position - run_start, *state))
    return result


async def map_export(
    client: Client,
    *,
    dirty_context: str | None = None,
    offset: int = 0,
    length: int | None = None,
    window: int = DEFAULT_WINDOW,
) -> list[MappedExtent]:
    """``base:allocation`` (and ``dirty_context``) over the range, merged; one request
    per window carries both contexts."""
    _require(client, BASE_ALLOCATION)
    if dirty_context is not None:
        _require(client, dirty_context)
    end = client.size if length is None else min(client.size, offset + length)
    result: list[MappedExtent] = []
    position = offset
    while position < end:
        reply = await client.block_status(min(window, end - position), position)
        allocation = reply.get(BASE_ALLOCATION) or []
        dirty = reply.get(dirty_context) if dirty_context is not None else None
        if not allocation or (dirty_context is not None and not dirty):
            raise RemoteProtocolError("block status reply without extents")
        merged = merge_extents(allocation, dirty)
        if result and merged:
            last, first = result[-1], merged[0]
            if (last.zero, last.hole, last.dirty) == (first.zero, first.hole, first.dirty):
                result[-1] = MappedExtent(
                    last.offset, last.length + first.length, last.zero, last.hole, last.dirty
                )
                merged = merged[1:]
        result.extend(merged)
        position = result[-1].end
    return result


#: block status requests sent in one write while mapping the dirty ranges
MAP_BATCH = 256


async def _allocation_of(client: Client, ranges: list[tuple[int, int]]) -> list[list[Extent]]:
    """``base:allocation`` of every range, complete: the ranges asked in batches (one
    write each), and what a reply left out asked again."""
    found: list[list[Extent]] = [[] for _ in ranges]
    todo = list(range(len(ranges)))
    position = [start for start, _ in ranges]
    while todo:
        batch, todo = todo[:MAP_BATCH], todo[MAP_BATCH:]
        replies = await client.block_status_many(
            [(ranges[i][1] - position[i], position[i]) for i in batch]
        )
        for i, reply in zip(batch, replies, strict=True):
            extents = reply.get(BASE_ALLOCATION)
            if not extents:
                raise RemoteProtocolError("block status reply without base:allocation extents")
            found[i] += extents
            position[i] = extents[-1].offset + extents[-1].length
            if position[i] < ranges[i][1]:
                todo.append(i)  # the server answered part of the range: ask the rest
    return found


def _dirty_ranges(extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """The dirty extents as merged ``[start, end)`` ranges."""
    ranges: list[tuple[int, int]] = []
    for extent in extents:
        if not extent.flags & STATE_DIRTY:
            continue
        end = extent.offset + extent.length
        if ranges and ranges[-1][1] == extent.offset:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((extent.offset, end))
    return ranges


async def map_dirty_first(
    dirty_client: Client,
    dirty_context: str,
    allocation_client: Client,
    *,
    window: int = 1 << 40,
) -> list[MappedExtent]:
    """What changed, mapped in time that follows the changes, not the disk.

    The dirty bitmap alone is walked over the whole export on ``dirty_client`` (which
    negotiated only that context: a connection with ``base:allocation`` too would have
    the server compute and send the allocation of every clean region as well); then
    ``base:allocation`` is asked on ``allocation_client`` only inside the dirty ranges,
    many requests in one write.  A clean range between them is one extent
    (``dirty=False``; whether it is allocated is not asked).
    """
    _require(dirty_client, dirty_context)
    _require(allocation_client, BASE_ALLOCATION)
    dirty = [e async for e in iter_block_status(dirty_client, dirty_context, window=window)]
    ranges = _dirty_ranges(dirty)
    found = await _allocation_of(allocation_client, ranges)
    result: list[MappedExtent] = []
    position = 0
    for (start, end), extents in zip(ranges, found, strict=True):
        if start > position:
            result.append(MappedExtent(position, start - position, False, False, False))
        result += merge_extents(extents, [Extent(start, end - start, STATE_DIRTY)])
        position = end
    if position < dirty_client.size:
        result.append(MappedExtent(position, dirty_client.size - position, False, False, False))
    return result

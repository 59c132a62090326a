"""Copying an export somewhere in one call: into a new raw file, into another NBD
export, or nowhere (``null:``).  What ``nbdclient copy`` runs; each is a source, a
plan from its map, a sink, and the engine."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ..constants import DEFAULT_REQUEST_SIZE
from ..uri import NBDURI
from .engine import CopyStats, ProgressCallback, Sink, copy
from .outfile import OutputFile
from .plan import Plan
from .sinks import NBDSink, NullSink, RawFileSink
from .source import Source


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """How to copy: batches in flight, connections (with multi-conn), bytes per read,
    whether zero extents are skipped (``sparse``) or read like data, handshake
    timeout."""

    requests: int = 16
    connections: int = 4
    request_size: int = DEFAULT_REQUEST_SIZE
    sparse: bool = True
    timeout: float = 10.0


async def copy_export(
    source: str | NBDURI,
    make_sink: Callable[[Source], Awaitable[Sink]],
    options: CopyOptions = CopyOptions(),
    *,
    progress: ProgressCallback | None = None,
) -> CopyStats:
    """Map ``source``, make the sink for it, copy."""
    async with await Source.open(source, timeout=options.timeout) as src:
        plan = Plan.from_extents(await src.map(), sparse=options.sparse)
        sink = await make_sink(src)
        return await copy(
            src,
            plan,
            sink,
            requests=options.requests,
            request_size=options.request_size,
            connections=options.connections,
            progress=progress,
        )


async def copy_to_file(
    source: str | NBDURI,
    path: str | Path,
    options: CopyOptions = CopyOptions(),
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> CopyStats:
    """Copy an export into a new raw file (zeros stay holes), which appears under
    ``path`` only when complete (see :mod:`nbdclient.copy.outfile`)."""
    output = OutputFile(Path(path), overwrite=overwrite)

    async def make_sink(src: Source) -> Sink:
        return RawFileSink(output, src.size)

    return await copy_export(source, make_sink, options, progress=progress)


async def copy_to_nbd(
    source: str | NBDURI,
    destination: str | NBDURI,
    options: CopyOptions = CopyOptions(),
    *,
    progress: ProgressCallback | None = None,
) -> CopyStats:
    """Copy an export into another NBD export (zeros as WRITE_ZEROES)."""

    async def make_sink(src: Source) -> Sink:
        return await NBDSink.open(destination, size=src.size, timeout=options.timeout)

    return await copy_export(source, make_sink, options, progress=progress)


async def copy_to_null(
    source: str | NBDURI,
    options: CopyOptions = CopyOptions(),
    *,
    progress: ProgressCallback | None = None,
) -> CopyStats:
    """Read an export and forget it (the source side's speed)."""

    async def make_sink(src: Source) -> Sink:
        return NullSink()

    return await copy_export(source, make_sink, options, progress=progress)

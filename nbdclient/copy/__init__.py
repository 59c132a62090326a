"""Copying NBD exports: one engine for every copy nbdclient and its users make.

    source.py        Source: an export's connections, size and map (multi-conn aware)
    plan.py          Plan: the byte ranges to read and to zero, from a map
    engine.py        copy(): batched, pooled reads into a Sink; the Sink protocol
    sinks.py         RawFileSink, NBDSink, NullSink
    outfile.py       OutputFile: a file that takes its name only when complete
    destinations.py  copy_to_file / copy_to_nbd / copy_to_null, what the CLI runs

A new destination is a new sink (see :mod:`nbdclient.copy.engine` for the contract);
the engine does not change.
"""

from ..constants import DEFAULT_REQUEST_SIZE
from .destinations import CopyOptions, copy_export, copy_to_file, copy_to_nbd, copy_to_null
from .engine import (
    WRITE_BATCH,
    Batch,
    BufferPool,
    CopyStats,
    Read,
    Run,
    Sink,
    copy,
)
from .outfile import OutputFile, check_destination
from .plan import Plan
from .sinks import NBDSink, NullSink, RawFileSink
from .source import Source

__all__ = [
    "DEFAULT_REQUEST_SIZE",
    "WRITE_BATCH",
    "Batch",
    "BufferPool",
    "CopyOptions",
    "CopyStats",
    "NBDSink",
    "NullSink",
    "OutputFile",
    "Plan",
    "RawFileSink",
    "Read",
    "Run",
    "Sink",
    "Source",
    "check_destination",
    "copy",
    "copy_export",
    "copy_to_file",
    "copy_to_nbd",
    "copy_to_null",
]

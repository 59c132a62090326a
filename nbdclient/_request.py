"""One outstanding request as the reply machine sees it: what was asked, where a read's
data goes, and which parts of it have arrived.  No I/O.

A read's chunks may come in any order but must never overlap, and a successful read is
complete only when they cover it exactly (NBD proto.md, "Structured reply chunk message
types": the server "MUST NOT send chunks that overlap" and the chunks together "MUST
cover the entire requested range").  :meth:`Request.cover` keeps what arrived as merged,
disjoint pieces: chunks in order (what qemu and nbdkit send) just extend the last piece.
"""

from __future__ import annotations

import bisect
from typing import Final

from ._transmission import check_within
from .constants import Command
from .errors import RemoteProtocolError, RequestError
from .values import Extent

#: Disjoint pieces of one read that may be outstanding at once (out-of-order chunks
#: with gaps between them); in-order chunks merge into one piece.
MAX_READ_PIECES: Final = 4096
_ZEROS: Final = bytes(1 << 20)


class Request:
    """One outstanding request, as the reply parser sees it.

    ``pieces`` (reads only) holds what arrived so far as sorted, disjoint, merged
    ranges relative to ``offset``, flattened: ``[start0, end0, start1, end1, ...]``;
    ``covered`` is their total length.
    """

    __slots__ = (
        "abandoned",
        "buf",
        "command",
        "cookie",
        "covered",
        "error",
        "extents",
        "length",
        "offset",
        "pieces",
        "req_one",
    )

    def __init__(
        self,
        cookie: int,
        command: Command,
        offset: int,
        length: int,
        buf: memoryview | None,
        req_one: bool,
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.buf = buf
        self.req_one = req_one
        self.abandoned = False
        self.error: RequestError | None = None
        self.extents: dict[str, list[Extent]] = {}
        self.covered = 0
        self.pieces: list[int] | None = [] if command == Command.READ else None

    def cover(self, start: int, end: int) -> None:
        """Record that ``[start, end)`` of a read (relative to its offset) arrived.

        Chunks usually come in order and merge into the last piece at once; an
        out-of-order chunk is placed by bisection.  Overlap is a protocol violation.
        """
        pieces = self.pieces
        assert pieces is not None
        if not pieces or start >= pieces[-1]:
            if pieces and start == pieces[-1]:
                pieces[-1] = end
            else:
                pieces += (start, end)
        else:
            # bisect_right: an odd index means ``start`` lies inside a piece
            i = bisect.bisect_right(pieces, start)
            if i & 1 or end > pieces[i]:
                raise RemoteProtocolError(
                    f"read chunk [{self.offset + start}, +{end - start}) overlaps data "
                    f"already received for the request [{self.offset}, +{self.length})"
                )
            left = i > 0 and pieces[i - 1] == start
            right = pieces[i] == end
            pieces[i - left : i + right] = ([] if left else [start]) + ([] if right else [end])
        if len(pieces) > 2 * MAX_READ_PIECES:
            raise RemoteProtocolError(f"read reply split into more than {MAX_READ_PIECES} pieces")
        self.covered += end - start

    def add_data(self, offset: int, length: int) -> memoryview | None:
        """An OFFSET_DATA chunk of ``length`` bytes at ``offset`` announced: where its
        data goes (None: into nowhere)."""
        check_within("OFFSET_DATA", offset, length, self.offset, self.length)
        rel = offset - self.offset
        self.cover(rel, rel + length)
        return None if self.buf is None else self.buf[rel : rel + length]

    def add_hole(self, offset: int, length: int) -> None:
        """An OFFSET_HOLE chunk: that range reads as zeros."""
        check_within("OFFSET_HOLE", offset, length, self.offset, self.length)
        rel = offset - self.offset
        self.cover(rel, rel + length)
        if self.buf is not None:
            end = rel + length
            while rel < end:
                step = min(end - rel, len(_ZEROS))
                self.buf[rel : rel + step] = _ZEROS[:step]
                rel += step

    def add_extents(self, context: str, extents: list[Extent]) -> None:
        """A block status chunk for ``context`` (one per context)."""
        if context in self.extents:
            raise RemoteProtocolError(f"two block status chunks for context {context}")
        self.extents[context] = extents

    def fail(self, errno: int, message: str = "") -> None:
        """The server reported an error; the first one is what the caller sees."""
        if self.error is None:
            self.error = RequestError(self.command.name, errno, message)

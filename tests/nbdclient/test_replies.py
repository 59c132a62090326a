"""The reply state machine fed bytes directly, no sockets: every reply type, every split
of the byte stream, out-of-order cookies, and what a hostile server must not get away
with (overlapping or duplicate read chunks, chunks outside the request, unknown cookies
and meta contexts)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdclient._events import Event, ProtocolViolation, RequestDone, RequestFailed
from nbdclient._replies import Replies, ReplyState
from nbdclient._request import MAX_READ_PIECES
from nbdclient.constants import (
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    ReplyType,
)
from nbdclient.errors import RemoteProtocolError, RequestError
from nbdclient.values import Extent

CONTEXTS = {10: "base:allocation", 11: "qemu:dirty-bitmap:b1"}


# ---- wire builders (a server's side of the transmission phase) ---------------------


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes, *, done: bool, ext: bool = False) -> bytes:
    flags = 1 if done else 0
    if ext:
        header = struct.pack(">IHHQQQ", EXTENDED_REPLY_MAGIC, flags, kind, cookie, 0, len(payload))
    else:
        header = struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
    return header + payload


def data(cookie: int, offset: int, raw: bytes, *, done: bool, ext: bool = False) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + raw, done=done, ext=ext)


def hole(cookie: int, offset: int, length: int, *, done: bool, ext: bool = False) -> bytes:
    payload = struct.pack(">QI", offset, length)
    return chunk(cookie, ReplyType.OFFSET_HOLE, payload, done=done, ext=ext)


def error(
    cookie: int, errno: int, message: str, *, at: int | None = None, ext: bool = False
) -> bytes:
    raw = message.encode()
    payload = struct.pack(">IH", errno, len(raw)) + raw
    if at is None:
        return chunk(cookie, ReplyType.ERROR, payload, done=True, ext=ext)
    payload += struct.pack(">Q", at)
    return chunk(cookie, ReplyType.ERROR_OFFSET, payload, done=True, ext=ext)


def status(
    cookie: int, context: int, extents: list[tuple[int, int]], *, done: bool, ext: bool = False
) -> bytes:
    if ext:
        body = struct.pack(">II", context, len(extents))
        body += b"".join(struct.pack(">QQ", n, f) for n, f in extents)
        return chunk(cookie, ReplyType.BLOCK_STATUS_EXT, body, done=done, ext=True)
    body = struct.pack(">I", context) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(cookie, ReplyType.BLOCK_STATUS, body, done=done)


def none(cookie: int, *, ext: bool = False) -> bytes:
    return chunk(cookie, ReplyType.NONE, b"", done=True, ext=ext)


# ---- scenarios: requests, the server's bytes, what must come out --------------------


@dataclass
class Scenario:
    """Requests registered in order (cookies 1, 2, ...), the wire, the events and the
    read buffers' contents that must result, however the wire is split."""

    requests: list[tuple[Command, int, int]]
    wire: Callable[[], bytes]
    events: list[Event]
    buffers: dict[int, bytes] = field(default_factory=dict)
    structured: bool = True
    extended: bool = False
    abandon: tuple[int, ...] = ()


def run(scenario: Scenario, cuts: Sequence[int]) -> tuple[list[Event], dict[int, bytearray]]:
    replies = Replies(
        structured=scenario.structured, extended=scenario.extended, size=1 << 20, contexts=CONTEXTS
    )
    buffers: dict[int, bytearray] = {}
    for command, offset, length in scenario.requests:
        buf = bytearray(b"\xee" * length) if command == Command.READ else None
        cookie, header = replies.request(
            command, offset, length, buf=None if buf is None else memoryview(buf)
        )
        assert len(header) == (32 if scenario.extended else 28)
        if buf is not None:
            buffers[cookie] = buf
    for cookie in scenario.abandon:
        replies.abandon(cookie)
    wire = scenario.wire()
    events: list[Event] = []
    position = 0
    for cut in [*sorted(cuts), len(wire)]:
        events += replies.receive_data(wire[position:cut])
        position = cut
    return events, buffers


def failed(cookie: int, command: Command, errno: int, message: str = "") -> RequestFailed:
    return RequestFailed(cookie, RequestError(command.name, errno, message))


A = b"A" * 512
B = b"B" * 512

SCENARIOS: dict[str, Scenario] = {
    "simple replies": Scenario(
        requests=[(Command.WRITE, 0, 4), (Command.FLUSH, 0, 0), (Command.READ, 512, 1024)],
        wire=lambda: simple(2, 5) + simple(1) + simple(3, data=A + B),
        events=[failed(2, Command.FLUSH, 5), RequestDone(1, None), RequestDone(3, None)],
        buffers={3: A + B},
        structured=False,
    ),
    "structured, out of order, data and holes": Scenario(
        requests=[(Command.READ, 0, 1024), (Command.READ, 4096, 1024)],
        wire=lambda: (
            data(2, 4096 + 512, B, done=False)
            + hole(1, 0, 512, done=False)
            + data(1, 512, A, done=True)
            + hole(2, 4096, 512, done=True)
        ),
        events=[RequestDone(1, None), RequestDone(2, None)],
        buffers={1: bytes(512) + A, 2: bytes(512) + B},
    ),
    "read chunks in reverse order": Scenario(
        requests=[(Command.READ, 0, 1536)],
        wire=lambda: (
            data(1, 1024, B, done=False) + hole(1, 512, 512, done=False) + data(1, 0, A, done=True)
        ),
        events=[RequestDone(1, None)],
        buffers={1: A + bytes(512) + B},
    ),
    "extended headers": Scenario(
        requests=[(Command.READ, 0, 1024), (Command.WRITE, 0, 4), (Command.BLOCK_STATUS, 0, 8192)],
        wire=lambda: (
            none(2, ext=True)
            + status(3, 11, [(1 << 33, 1)], done=False, ext=True)
            + data(1, 0, A + B, done=False, ext=True)
            + status(3, 10, [(4096, 0), (4096, 3)], done=True, ext=True)
            + none(1, ext=True)
        ),
        events=[
            RequestDone(2, None),
            RequestDone(
                3,
                {
                    "qemu:dirty-bitmap:b1": [Extent(0, 8192, 1)],
                    "base:allocation": [Extent(0, 4096, 0), Extent(4096, 4096, 3)],
                },
            ),
            RequestDone(1, None),
        ],
        buffers={1: A + B},
        extended=True,
    ),
    "block status, compact": Scenario(
        requests=[(Command.BLOCK_STATUS, 4096, 10000)],
        wire=lambda: (
            status(1, 10, [(4096, 0), (4096, 0), (8192, 3)], done=False)
            + status(1, 11, [(65536, 1)], done=False)
            + none(1)
        ),
        events=[
            RequestDone(
                1,
                {
                    "base:allocation": [Extent(4096, 8192, 0), Extent(12288, 1808, 3)],
                    "qemu:dirty-bitmap:b1": [Extent(4096, 10000, 1)],
                },
            )
        ],
    ),
    "error chunks keep the connection": Scenario(
        requests=[
            (Command.READ, 0, 512),
            (Command.TRIM, 0, 512),
            (Command.CACHE, 0, 512),
            (Command.READ, 512, 512),
        ],
        wire=lambda: (
            error(1, 5, "media error")
            + error(2, 1, "no", at=4096)
            + chunk(3, 0x8123, b"\0\0\0\x05\0\0", done=True)
            + data(4, 512, B, done=True)
        ),
        events=[
            failed(1, Command.READ, 5, "media error"),
            failed(2, Command.TRIM, 1, "no (at offset 4096)"),
            failed(3, Command.CACHE, 22, "unknown error chunk type 0x8123"),
            RequestDone(4, None),
        ],
        buffers={4: B},
    ),
    "late chunks of a finished cookie are dropped (qemu 7.2)": Scenario(
        requests=[(Command.BLOCK_STATUS, 0, 4096), (Command.READ, 0, 512)],
        wire=lambda: (
            error(1, 22, "can't get block status")
            + status(1, 11, [(4096, 1)], done=True)
            + data(1, 0, A, done=True)
            + data(2, 0, B, done=True)
        ),
        events=[
            failed(1, Command.BLOCK_STATUS, 22, "can't get block status"),
            RequestDone(2, None),
        ],
        buffers={2: B},
    ),
    "abandoned requests are consumed into nowhere": Scenario(
        requests=[(Command.READ, 0, 1024), (Command.READ, 0, 512), (Command.BLOCK_STATUS, 0, 9)],
        abandon=(1, 3),
        wire=lambda: (
            data(1, 0, A + B, done=True)
            + status(3, 10, [(9, 0)], done=True)
            + data(2, 0, A, done=True)
        ),
        events=[RequestDone(2, None)],
        buffers={1: b"\xee" * 1024, 2: A},
    ),
}


def key(event: Event) -> tuple[object, ...]:
    """Events compare by kind, cookie and result; errors by errno and message."""
    if isinstance(event, RequestDone):
        return ("done", event.cookie, event.extents)
    if isinstance(event, RequestFailed):
        return ("failed", event.cookie, event.error.errno, str(event.error))
    return ("violation", str(event.error))


def same(got: list[Event], want: list[Event]) -> None:
    assert [key(e) for e in got] == [key(e) for e in want]


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_two_way_split(name: str) -> None:
    scenario = SCENARIOS[name]
    size = len(scenario.wire())
    for cut in range(size + 1):
        events, buffers = run(scenario, [cut])
        same(events, scenario.events)
        for cookie, expected in scenario.buffers.items():
            assert buffers[cookie] == expected, (name, cut)


@pytest.mark.parametrize("name", SCENARIOS)
def test_one_byte_at_a_time(name: str) -> None:
    scenario = SCENARIOS[name]
    events, buffers = run(scenario, range(len(scenario.wire())))
    same(events, scenario.events)
    for cookie, expected in scenario.buffers.items():
        assert buffers[cookie] == expected


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(SCENARIOS)),
    cuts=st.lists(st.integers(min_value=0, max_value=8192), max_size=12),
)
def test_any_split(name: str, cuts: list[int]) -> None:
    scenario = SCENARIOS[name]
    size = len(scenario.wire())
    events, buffers = run(scenario, [c % (size + 1) for c in cuts])
    same(events, scenario.events)
    for cookie, expected in scenario.buffers.items():
        assert buffers[cookie] == expected


# ---- protocol violations: the stream is dead, every request lost ---------------------


def machine(*, structured: bool = True, extended: bool = False) -> Replies:
    return Replies(structured=structured, extended=extended, size=1 << 20, contexts=CONTEXTS)


VIOLATIONS: dict[str, tuple[Command, int, int, bytes, str]] = {
    # name: (request, wire answering cookie 1, words of the error)
    "the same half twice": (
        Command.READ,
        0,
        1024,
        data(1, 0, A, done=False) + data(1, 0, A, done=True),
        "overlaps",
    ),
    "a hole over data": (
        Command.READ,
        0,
        1024,
        data(1, 0, A, done=False) + hole(1, 256, 768, done=True),
        "overlaps",
    ),
    "data over a hole, out of order": (
        Command.READ,
        0,
        1536,
        hole(1, 1024, 512, done=False) + data(1, 0, A, done=False) + data(1, 768, A, done=True),
        "overlaps",
    ),
    "a chunk past the request": (
        Command.READ,
        0,
        512,
        data(1, 508, b"12345678", done=True),
        "outside the request",
    ),
    "a chunk before the request": (
        Command.READ,
        4096,
        512,
        hole(1, 4095, 10, done=True),
        "outside the request",
    ),
    "an OFFSET_DATA chunk longer than the request": (
        Command.READ,
        0,
        4,
        data(1, 0, b"12345", done=True),
        "bad length",
    ),
    "a read covered in part": (
        Command.READ,
        0,
        1024,
        data(1, 512, A, done=True),
        "covered 512 of 1024",
    ),
    "a simple read reply after a chunk": (
        Command.READ,
        0,
        512,
        data(1, 0, A[:256], done=False) + simple(1, data=A),
        "overlaps",
    ),
    "an unknown cookie": (Command.FLUSH, 0, 0, none(7), "unknown cookie 7"),
    "block status for an unknown context id": (
        Command.BLOCK_STATUS,
        0,
        4096,
        status(1, 99, [(4096, 0)], done=True),
        "context id 99",
    ),
    "two block status chunks for one context": (
        Command.BLOCK_STATUS,
        0,
        4096,
        status(1, 10, [(4096, 0)], done=False) + status(1, 10, [(4096, 0)], done=True),
        "two block status chunks",
    ),
    "block status for a read": (
        Command.READ,
        0,
        512,
        status(1, 10, [(512, 0)], done=True),
        "another command",
    ),
    "OFFSET_DATA for a write": (Command.WRITE, 0, 512, data(1, 0, A, done=True), "not a read"),
    "OFFSET_HOLE for a write": (Command.WRITE, 0, 512, hole(1, 0, 512, done=True), "not a read"),
    "an unknown chunk type": (Command.FLUSH, 0, 0, chunk(1, 77, b"", done=True), "type 77"),
    "NONE without DONE": (Command.FLUSH, 0, 0, chunk(1, 0, b"", done=False), "without the DONE"),
    "NONE with a payload": (Command.FLUSH, 0, 0, chunk(1, 0, b"x", done=True), "with a payload"),
    "a bad magic": (Command.FLUSH, 0, 0, struct.pack(">I", 0x12345678) + bytes(12), "magic"),
    "an extended reply without extended headers": (
        Command.FLUSH,
        0,
        0,
        none(1, ext=True),
        "without negotiated extended",
    ),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_violations(name: str) -> None:
    command, offset, length, wire, words = VIOLATIONS[name]
    for cuts in ([], range(len(wire))):  # whole, and one byte at a time
        replies = machine()
        buf = memoryview(bytearray(length)) if command == Command.READ else None
        replies.request(command, offset, length, buf=buf)
        replies.request(Command.FLUSH, 0, 0)  # an innocent bystander
        events: list[Event] = []
        position = 0
        for cut in [*cuts, len(wire)]:
            events += replies.receive_data(wire[position:cut])
            position = cut
        assert len(events) == 1 and isinstance(events[0], ProtocolViolation), events
        assert words in str(events[0].error)
        assert replies.state is ReplyState.DEAD and replies.outstanding == 0
        # dead: nothing more is read, nothing more is sent
        assert replies.receive_data(simple(2)) == []
        with pytest.raises(RemoteProtocolError, match=words):
            replies.request(Command.FLUSH, 0, 0)


def test_violations_by_negotiated_mode() -> None:
    off = machine(structured=False)
    off.request(Command.FLUSH, 0, 0)
    (event,) = off.receive_data(none(1))
    assert isinstance(event, ProtocolViolation) and "structured replies are off" in str(event.error)
    ext = machine(extended=True)
    ext.request(Command.FLUSH, 0, 0)
    (event,) = ext.receive_data(simple(1))
    assert isinstance(event, ProtocolViolation) and "expected an extended reply" in str(event.error)
    ext = machine(extended=True)
    ext.request(Command.BLOCK_STATUS, 0, 512)
    (event,) = ext.receive_data(status(1, 10, [(512, 0)], done=True))  # compact status chunk
    assert isinstance(event, ProtocolViolation)


def test_completions_before_a_violation_are_kept() -> None:
    replies = machine()
    replies.request(Command.FLUSH, 0, 0)
    replies.request(Command.FLUSH, 0, 0)
    events = replies.receive_data(none(1) + none(9))
    assert [key(e) for e in events] == [
        ("done", 1, None),
        ("violation", "reply for unknown cookie 9"),
    ]


def test_too_many_pieces() -> None:
    """A read chopped into more disjoint pieces than the limit is refused (each new
    piece costs memory); in-order adjacent pieces merge and cost nothing."""
    length = 2 * (MAX_READ_PIECES + 1)
    replies = machine()
    replies.request(Command.READ, 0, length, buf=memoryview(bytearray(length)))
    # every other byte first (gaps between), in order
    wire = b"".join(data(1, 2 * i, b"x", done=False) for i in range(MAX_READ_PIECES + 1))
    (event,) = replies.receive_data(wire)
    assert isinstance(event, ProtocolViolation) and "more than 4096 pieces" in str(event.error)
    adjacent = machine()
    adjacent.request(Command.READ, 0, length, buf=memoryview(bytearray(length)))
    wire = b"".join(data(1, i, b"x", done=i == length - 1) for i in range(length))
    assert [key(e) for e in adjacent.receive_data(wire)] == [("done", 1, None)]


def test_connection_closed() -> None:
    replies = machine()
    replies.request(Command.READ, 0, 512, buf=memoryview(bytearray(512)))
    replies.receive_data(data(1, 0, A, done=True)[:30])
    replies.close(RemoteProtocolError("gone"))
    assert replies.state is ReplyState.DEAD and replies.outstanding == 0
    with pytest.raises(RemoteProtocolError, match="gone"):
        replies.request(Command.FLUSH, 0, 0)


# ---- zero-copy receive ----------------------------------------------------------------


def test_read_data_is_received_into_the_callers_buffer() -> None:
    """Once a chunk's header and offset are in, the machine hands out the caller's own
    buffer (the right slice of it), so the socket writes the data there directly."""
    before = hole(1, 4096, 256, done=False)
    cases = [(True, before + data(1, 4096 + 256, A, done=True), len(before) + 28, 256)]
    cases.append((False, simple(1, data=A), 16, 0))
    for structured, wire, header, where in cases:
        replies = machine(structured=structured)
        target = bytearray(b"\xee" * (where + 512))
        offset = 4096 if structured else 0
        replies.request(Command.READ, offset, len(target), buf=memoryview(target))
        assert replies.receive_data(wire[:header]) == []
        buf = replies.get_buffer()
        assert buf.obj is target and len(buf) == 512
        buf[:100] = A[:100]
        assert replies.received(100) == ()
        buf = replies.get_buffer()
        assert buf.obj is target and len(buf) == 412
        buf[:] = A[100:]
        assert [key(e) for e in replies.received(412)] == [("done", 1, None)]
        assert target == bytes(where) + A
        assert replies.get_buffer().obj is not target  # the next header: scratch


def test_abandoned_mid_data() -> None:
    """The caller goes away while its data streams in: the rest goes nowhere."""
    replies = machine()
    target = bytearray(b"\xee" * 512)
    replies.request(Command.READ, 0, 512, buf=memoryview(target))
    replies.request(Command.FLUSH, 0, 0)
    wire = data(1, 0, A, done=True) + none(2)
    assert replies.receive_data(wire[: 28 + 100]) == []
    replies.abandon(1)
    assert replies.get_buffer().obj is not target
    assert [key(e) for e in replies.receive_data(wire[28 + 100 :])] == [("done", 2, None)]
    assert target == A[:100] + b"\xee" * 412


# ---- coverage: any order and any chunking, exact cover or refusal ------------------------


@st.composite
def read_chunks(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, bool]]]:
    """A read length and chunks (start, length, is_data): a shuffled exact partition,
    or random ranges that may overlap or leave gaps."""
    length = draw(st.integers(min_value=1, max_value=4096))
    if draw(st.booleans()):
        cuts = (
            sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=12))))
            if length > 1
            else []
        )
        bounds = [0, *cuts, length]
        pieces = [(a, b - a, draw(st.booleans())) for a, b in itertools.pairwise(bounds)]
        return length, draw(st.permutations(pieces))
    ranges = []
    for _ in range(draw(st.integers(1, 8))):
        start = draw(st.integers(0, length - 1))
        ranges.append((start, draw(st.integers(1, length - start)), draw(st.booleans())))
    return length, ranges


@settings(max_examples=400, deadline=None)
@given(read_chunks(), st.lists(st.integers(min_value=0), max_size=6), st.integers(0, 1 << 20))
def test_read_cover_is_exact(
    case: tuple[int, list[tuple[int, int, bool]]], cuts: list[int], base: int
) -> None:
    """A read completes only when its chunks cover it exactly once; the first chunk that
    overlaps earlier ones is refused; a gap is refused at DONE.  What completes holds the
    data and zeros sent, and nothing of the buffer's old bytes."""
    length, chunks = case
    base = min(base, (1 << 20) - length)
    content = bytes((base + i) % 251 for i in range(length))
    wire = b"".join(
        data(1, base + s, content[s : s + n], done=i == len(chunks) - 1)
        if is_data
        else hole(1, base + s, n, done=i == len(chunks) - 1)
        for i, (s, n, is_data) in enumerate(chunks)
    )
    seen: list[tuple[int, int]] = []
    expected = "done"
    for s, n, _ in chunks:
        if any(s < e and t < s + n for t, e in seen):
            expected = "overlaps"
            break
        seen.append((s, s + n))
    else:
        if sum(n for _, n, _ in chunks) != length:
            expected = f"covered {sum(n for _, n, _ in chunks)} of {length}"
    replies = machine()
    target = bytearray(b"\xee" * length)
    replies.request(Command.READ, base, length, buf=memoryview(target))
    events: list[Event] = []
    position = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        events += replies.receive_data(wire[position:cut])
        position = cut
    (event,) = events
    if expected == "done":
        assert isinstance(event, RequestDone)
        want = bytearray(length)
        for s, n, is_data in chunks:
            if is_data:
                want[s : s + n] = content[s : s + n]
        assert target == want
    else:
        assert isinstance(event, ProtocolViolation) and expected in str(event.error)

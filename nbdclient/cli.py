"""``nbdclient``: inspect and copy NBD exports from the command line.

    nbdclient info URI [--json]         size, flags, block sizes, meta contexts
    nbdclient list URI                  export names and descriptions
    nbdclient contexts URI [QUERY...]   meta contexts (e.g. qemu: or qemu:dirty-bitmap:)
    nbdclient map URI [--context C]     extents of a meta context (--json)
    nbdclient copy URI DEST [--force]   DEST: a new file (0600), null:, or an NBD URI

Exit codes: 0 success, 1 NBD error, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __name__ as _pkg
from .client import connect
from .constants import BASE_ALLOCATION
from .copy import (
    DEFAULT_REQUEST_SIZE,
    CopyOptions,
    check_destination,
    copy_to_file,
    copy_to_nbd,
    copy_to_null,
)
from .errors import NBDError, NegotiationError, UnsupportedError
from .extents import iter_block_status
from .queries import list_exports, list_meta_contexts
from .uri import parse_uri


async def _info(args: argparse.Namespace) -> int:
    try:
        contexts = await list_meta_contexts(args.uri, timeout=args.timeout)
    except (NegotiationError, UnsupportedError):
        contexts = []  # an old server without meta contexts
    async with await connect(args.uri, meta_contexts=contexts, timeout=args.timeout) as client:
        flags = [f.name for f in type(client.flags) if f in client.flags and f.name]
        data: dict[str, Any] = {
            "export": client.export_name,
            "description": client.description,
            "size": client.size,
            "read_only": client.is_read_only(),
            "can_flush": client.can_flush(),
            "can_fua": client.can_fua(),
            "can_trim": client.can_trim(),
            "can_zero": client.can_zero(),
            "can_fast_zero": client.can_fast_zero(),
            "can_df": client.can_df(),
            "can_cache": client.can_cache(),
            "can_multi_conn": client.can_multi_conn(),
            "flags": flags,
            "block_size": {
                "minimum": client.block_size.minimum,
                "preferred": client.block_size.preferred,
                "maximum": client.block_size.maximum,
            },
            "structured_replies": client.structured_replies,
            "extended_headers": client.extended_headers,
            "tls": client.tls,
            "meta_contexts": sorted(client.meta_contexts),
        }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            if isinstance(value, list):
                value = " ".join(value) or "-"
            elif isinstance(value, dict):
                value = " ".join(f"{k}={v}" for k, v in value.items())
            print(f"{key}: {value}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    exports = await list_exports(args.uri, timeout=args.timeout)
    if args.json:
        print(json.dumps([{"name": e.name, "description": e.description} for e in exports]))
        return 0
    for export in exports:
        print(export.name if not export.description else f"{export.name}\t{export.description}")
    return 0


def describe(context: str, flags: int) -> str:
    """The words nbdinfo --map prints for a state."""
    if context == BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(flags, "unknown")
    if context.startswith("qemu:dirty-bitmap:"):
        return "dirty" if flags & 1 else "clean"
    if context == "qemu:allocation-depth":
        return "unallocated" if flags == 0 else "local" if flags == 1 else f"backing depth {flags}"
    return ""


async def _contexts(args: argparse.Namespace) -> int:
    for name in await list_meta_contexts(args.uri, queries=args.query, timeout=args.timeout):
        print(name)
    return 0


async def _map(args: argparse.Namespace) -> int:
    async with await connect(args.uri, meta_contexts=[args.context], timeout=args.timeout) as c:
        rows = [
            {
                "offset": e.offset,
                "length": e.length,
                "flags": e.flags,
                "description": describe(args.context, e.flags),
            }
            async for e in iter_block_status(c, args.context)
        ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(
                f"{row['offset']:>16} {row['length']:>16} {row['flags']:>4}  {row['description']}"
            )
    return 0


async def _copy(args: argparse.Namespace) -> int:
    start = time.monotonic()
    dest = args.destination
    to_nbd = dest.startswith(("nbd:", "nbds:", "nbd+", "nbds+"))
    if not to_nbd and dest != "null:":
        problem = _file_destination_problem(Path(dest), args.force)
        if problem:
            print(f"{_pkg}: {problem}", file=sys.stderr)
            return 2
    bar: Any = None
    if sys.stderr.isatty() and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
    options = CopyOptions(
        requests=args.requests,
        connections=args.connections,
        request_size=args.request_size,
        timeout=args.timeout,
    )
    progress = bar.update if bar is not None else None
    if to_nbd:
        stats = await copy_to_nbd(args.source, dest, options, progress=progress)
    elif dest == "null:":
        stats = await copy_to_null(args.source, options, progress=progress)
    else:
        stats = await copy_to_file(
            args.source, dest, options, overwrite=args.force, progress=progress
        )
    if bar is not None:
        bar.close()
    if not args.quiet:
        took = time.monotonic() - start
        rate = stats.bytes_read / took / (1 << 20) if took else 0.0
        print(
            f"copied {stats.bytes_read} data bytes of {stats.size} ({stats.bytes_zero} zero) "
            f"in {took:.2f} s, {rate:.0f} MiB/s",
            file=sys.stderr,
        )
    return 0


def _file_destination_problem(path: Path, force: bool) -> str | None:
    """Why a file cannot be written at ``path`` (None: it can)."""
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    try:
        check_destination(path, overwrite=force)
    except FileExistsError:
        return f"{path} exists; use --force to replace it"
    except OSError as exc:
        return f"{path} {exc.strerror}"
    return None


def _size(text: str) -> int:
    """A read size: bytes, or a number with K or M (powers of 1024)."""
    match = re.fullmatch(r"(\d+)([KkMm]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512K or 2M)")
    value = int(match[1]) << {"": 0, "k": 10, "m": 20}[match[2].lower()]
    if not 4096 <= value <= 32 << 20:
        raise argparse.ArgumentTypeError(f"read size {text} is not between 4K and 32M")
    return value


def _uri(text: str) -> str:
    try:
        parse_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdclient",
        description="Inspect and copy NBD exports.",
        epilog="URIs: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://... "
        "(TLS: ?tls-certificates=DIR or tls-ca-file=, tls-certificate-file=, tls-key-file=). "
        "Exit codes: 0 success, 1 NBD error, 2 usage error.",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="handshake timeout (s)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = sub.add_parser("info", help="size, flags, block sizes and meta contexts of an export")
    p.add_argument("uri", type=_uri)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_info)
    p = sub.add_parser("list", help="list the server's exports")
    p.add_argument("uri", type=_uri)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_list)
    p = sub.add_parser("contexts", help="list meta contexts (queries like qemu: )")
    p.add_argument("uri", type=_uri)
    p.add_argument("query", nargs="*")
    p.set_defaults(run=_contexts)
    p = sub.add_parser("map", help="print the extents of a meta context")
    p.add_argument("uri", type=_uri)
    p.add_argument("--context", default=BASE_ALLOCATION)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_map)
    p = sub.add_parser("copy", help="copy an export to a file, null: or an NBD URI")
    p.add_argument("source", type=_uri)
    p.add_argument("destination")
    p.add_argument(
        "--requests",
        type=int,
        default=16,
        help="batches of reads in flight, each up to 2 MiB (default 16)",
    )
    p.add_argument("--connections", type=int, default=4, help="with multi-conn (default 4)")
    p.add_argument(
        "--request-size",
        type=_size,
        default=DEFAULT_REQUEST_SIZE,
        help="bytes per read, e.g. 256K or 2M (default 512K)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing destination file")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(run=_copy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = asyncio.run(args.run(args))
        return result
    except NBDError as exc:
        print(f"{_pkg}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{_pkg}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

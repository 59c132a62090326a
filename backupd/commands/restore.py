"""``backupd restore``: write one disk of a backup to a file or into an NBD target."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from pathlib import Path

from backupd.commands import CommandContext
from backupd.config import ImageFormat
from backupd.errors import UsageError
from backupd.logs import human_bytes
from backupd.progress import Progress, ProgressMode, progress_mode
from backupd.restore import check_output, restore_to_file, restore_to_nbd
from backupd.serving import ServedImage
from backupd.storage.repositories import repository_for

NAME = "restore"
DESCRIPTION = """\
Restore one disk of a backup (any point of a chain) through the served backup image:
into a raw file (sparse: zeros stay holes), a qcow2 file, or an NBD target.

examples:
  backupd restore --vm guest1 --disk vda --output /var/tmp/vda.raw
  backupd restore --vm guest1 --backup 20261124T030000Z --disk vda --output vda.qcow2 \\
      --format qcow2
  backupd restore --vm guest1 --disk vda --to 'nbd+unix:///vda?socket=/run/new.sock'
"""

log = logging.getLogger("backupd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--backup", default="latest", help="backup id (default: latest)")
    parser.add_argument("--disk", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", type=Path, help="file to write")
    where.add_argument("--to", metavar="NBD_URI", help="NBD export to write into")
    parser.add_argument(
        "--format",
        type=ImageFormat,
        choices=list(ImageFormat),
        default=ImageFormat.RAW,
        help="the output's format (default: raw)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


async def _restore(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    repo = repository_for(config).vm(config.vm(args.vm).name)
    if args.output is not None:
        check_output(args.output, args.force)
    if args.to is not None:
        from nbdclient import parse_uri

        try:
            parse_uri(args.to)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    started = time.monotonic()
    with repo.readers(purpose=f"backupd restore --vm {args.vm}"):
        manifest = repo.resolve(args.backup)
        async with ServedImage(repo, manifest, [args.disk]) as (disk,):
            mode = progress_mode(context.quiet)
            bar = (
                Progress(f"{repo.vm}/{disk.name}", disk.size, mode=mode)
                if mode is not ProgressMode.NONE
                else None
            )
            update = bar.update if bar is not None else None
            try:
                if args.to is not None:
                    stats = await restore_to_nbd(disk.uri, args.to, progress=update)
                    target = args.to
                else:
                    stats = await restore_to_file(
                        disk.uri, args.output, fmt=args.format, force=args.force, progress=update
                    )
                    target = str(args.output)
            finally:
                if bar is not None:
                    bar.close()
    log.info(
        "restored %s/%s from backup %s to %s: %s of data, %s zero, %.1fs",
        repo.vm,
        args.disk,
        manifest.id,
        target,
        human_bytes(stats.data),
        human_bytes(stats.zero),
        time.monotonic() - started,
    )
    return 0


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    return asyncio.run(_restore(args, context))

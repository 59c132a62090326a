"""``backupd restore``: write one disk of a backup to a file or into an NBD target."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import time
from pathlib import Path

from backupd.commands import CommandContext
from backupd.config import ImageFormat
from backupd.errors import UsageError
from backupd.interrupt import Interrupt, run_interruptible
from backupd.keys import vm_key
from backupd.logs import human_bytes
from backupd.progress import Progress, ProgressMode, progress_mode
from backupd.restore import check_output, restore_to_file, restore_to_nbd
from backupd.serving import ServedImage
from backupd.storage.repositories import repository_for

NAME = "restore"
#: SIGINT/SIGTERM stay blocked until the event loop handles them (backupd.interrupt)
HANDLES_SIGNALS = True
DESCRIPTION = """\
Restore one disk of a backup (any point of a chain) through the served backup image:
into a raw file (sparse: zeros stay holes), a qcow2 file, or an NBD target.

examples:
  backupd restore --vm guest1 --disk vda --output /var/tmp/vda.raw
  backupd restore --vm guest1 --backup 20261124T030000Z --disk vda --output vda.qcow2 \\
      --format qcow2
  backupd restore --vm guest1 --disk vda --to 'nbd+unix:///vda?socket=/run/new.sock'

Live: the VM boots from the served backup at once, while qemu copies every cluster
into the new qcow2 file in the background; backupd prints the -blockdev option that
opens the file and waits (--wait) for the VM's qemu on --target-qmp:
  backupd restore --live --vm guest1 --disk vda --output /var/lib/vms/vda.qcow2 \\
      --target-qmp /run/qemu/guest1-restore.qmp
  backupd restore --live --resume --output /var/lib/vms/vda.qcow2 \\
      --target-qmp /run/qemu/guest1-restore.qmp      # after a kill or a VM restart
"""

log = logging.getLogger("backupd")
_RATE = re.compile(r"(\d+)([KMG]?)(?:i?B)?(?:/s)?", re.IGNORECASE)


def _rate(text: str) -> int:
    """``--speed``: bytes per second, with an optional K, M or G (powers of 1024);
    0 is unlimited."""
    found = _RATE.fullmatch(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 50M for 50 MiB/s, or 0)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[found.group(2).upper()]
    return int(found.group(1)) * scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", help="the VM whose backup to restore")
    parser.add_argument("--backup", help="backup id (default: latest)")
    parser.add_argument("--disk", help="the disk to restore")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", type=Path, help="file to write")
    where.add_argument("--to", metavar="NBD_URI", help="NBD export to write into")
    parser.add_argument(
        "--format",
        type=ImageFormat,
        choices=list(ImageFormat),
        help="of --output (default: raw)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    live = parser.add_argument_group("live restore")
    live.add_argument(
        "--live", action="store_true", help="boot the VM from the backup now, copy meanwhile"
    )
    live.add_argument(
        "--resume", action="store_true", help="finish a live restore (after a kill or a VM stop)"
    )
    live.add_argument("--target-qmp", metavar="SOCKET", help="QMP socket of the VM restored into")
    live.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for that VM's qemu (default: 600)",
    )
    live.add_argument(
        "--speed",
        type=_rate,
        metavar="RATE",
        help="copy at most RATE bytes/s (K, M, G: KiB, MiB, GiB; 0: unlimited)",
    )


async def _restore(args: argparse.Namespace, context: CommandContext, interrupt: Interrupt) -> int:
    if args.vm is None or args.disk is None:
        raise UsageError("restore needs --vm and --disk")
    if args.target_qmp is not None or args.resume or args.speed is not None:
        raise UsageError("--target-qmp, --resume and --speed go with --live")
    config = context.config()
    vm = config.vm(args.vm)
    repo = repository_for(config).vm(vm.name)
    if args.output is not None:
        check_output(args.output, args.force)
    if args.to is not None:
        from nbdclient import parse_uri

        try:
            parse_uri(args.to)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    started = time.monotonic()
    with vm_key(vm.encryption) as key, repo.readers(purpose=f"backupd restore --vm {args.vm}"):
        manifest = repo.resolve(args.backup)
        async with ServedImage(repo, manifest, [args.disk], key=key) as (disk,):
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
                        disk.uri,
                        args.output,
                        fmt=args.format or ImageFormat.RAW,
                        force=args.force,
                        progress=update,
                    )
                    target = str(args.output)
            except asyncio.CancelledError:
                if interrupt.signal is not None:  # the output's temporary file is gone
                    log.error("restore interrupted (%s); nothing was written", interrupt.name)
                raise
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
    if args.live or args.resume:
        from backupd.live.command import execute as live_restore

        return live_restore(args, context)
    return run_interruptible(lambda interrupt: _restore(args, context, interrupt))

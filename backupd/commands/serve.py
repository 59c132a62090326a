"""``backupd serve``: one backup, read-only over NBD, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from backupd.commands import CommandContext
from backupd.errors import BackupdError, UsageError
from backupd.keys import vm_key
from backupd.serving import ServedImage, load_psk_file
from backupd.storage.repositories import repository_for

NAME = "serve"
DESCRIPTION = """\
Serve every disk of one backup (any point of a chain) read-only over NBD, one export
per disk named after it, until interrupted.  Readable by nbdinfo, qemu-img, nbdcopy,
and qemu itself (-blockdev driver=nbd: boot a VM from its backup).

examples:
  backupd serve --vm guest1                                  # latest, private unix socket
  backupd serve --vm guest1 --backup 20261124T030000Z --socket /run/backupd/guest1.sock
  backupd serve --vm guest1 --listen 192.0.2.10:10809 --tls-dir /etc/pki/backupd
  backupd serve --vm guest1 --listen '[2001:db8::10]:10809' --tls-psk-file /etc/backupd/keys.psk

With --tls-psk-file (lines of USERNAME:HEXKEY, as `psktool -u NAME -p FILE` writes
them) a client connects with the key of its user, e.g.
  nbdclient map 'nbds://192.0.2.10/vda?tls-psk-file=my.psk&tls-username=alice'
  nbdinfo --map 'nbds://alice@192.0.2.10/vda?tls-psk-file=my.psk'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--backup", default="latest", help="backup id (default: latest)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help="unix socket to listen on")
    where.add_argument(
        "--listen", metavar="HOST:PORT", help="TCP address (needs --tls-dir or --tls-psk-file)"
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--tls-dir", type=Path, help="folder with ca-cert.pem, server-cert.pem, server-key.pem"
    )
    tls.add_argument(
        "--tls-psk-file", type=Path, help="pre-shared keys: lines of USERNAME:HEXKEY (TLS-PSK)"
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="allow TCP without TLS (trusted networks only)",
    )


def _listen(text: str | None) -> tuple[str, int] | None:
    """HOST:PORT, an IPv6 address in brackets: ``[2001:db8::1]:10809``."""
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--listen: an IPv6 address goes in brackets, [{host}]:{port}")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen wants HOST:PORT, not {text!r}")
    return host, int(port)


async def _serve(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    vm = config.vm(args.vm)
    repo = repository_for(config).vm(vm.name)
    listen = _listen(args.listen)
    tls = args.tls_dir is not None or args.tls_psk_file is not None
    if listen is None and tls:
        raise UsageError("--tls-dir and --tls-psk-file go with --listen (TLS is for TCP)")
    if listen is not None and not tls and not args.insecure_plaintext:
        raise UsageError(
            "serving over TCP needs --tls-dir or --tls-psk-file (or --insecure-plaintext)"
        )
    psk_keys = load_psk_file(args.tls_psk_file) if args.tls_psk_file is not None else None
    with vm_key(vm.encryption) as key, repo.readers(purpose=f"backupd serve --vm {args.vm}"):
        manifest = repo.resolve(args.backup)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        image = ServedImage(
            repo,
            manifest,
            socket=args.socket,
            listen=listen,
            tls_dir=args.tls_dir,
            psk_keys=psk_keys,
            key=key,
        )
        async with image as disks:
            print(
                f"serving backup {manifest.id} of vm {repo.vm} ({manifest.kind}); Ctrl-C to stop",
                file=sys.stderr,
            )
            for disk in disks:
                print(disk.uri, flush=True)
            stopped = asyncio.create_task(stop.wait())
            exited = asyncio.create_task(image.wait())
            await asyncio.wait({stopped, exited}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if exited.done():  # qemu-storage-daemon died under us: say so, exit 1
                raise BackupdError(f"serving backup {manifest.id} stopped: {exited.result()}")
            exited.cancel()
    return 0


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    return asyncio.run(_serve(args, context))

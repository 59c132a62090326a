"""``backupd restore --live`` and ``--live --resume``: the arguments, the signals, and
the way from the command line to :class:`backupd.live.flow.LiveRestore`.

SIGINT and SIGTERM stop backupd, never the guest: before the output exists (or while
nothing has opened it yet) what was made is removed; once a VM runs on the output, the
copy goes on inside its qemu and the point stays served, and the log says how to
``--resume``.  Exit 130 (SIGINT) or 143 (SIGTERM) either way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from backupd.commands import CommandContext
from backupd.errors import UsageError
from backupd.interrupt import Interrupt, run_interruptible
from backupd.keys import Encryption, vm_key
from backupd.live import state as live_state
from backupd.live.flow import (
    LiveOptions,
    LiveRestore,
    check_disk,
    clear_leftover,
    remove_leftover,
)
from backupd.live.overlay import backing_file
from backupd.live.state import StateError
from backupd.manifest import Manifest
from backupd.private import runtime_base
from backupd.repository import VMRepository
from backupd.storage.repositories import local_repository

log = logging.getLogger("backupd")


def options(args: argparse.Namespace, context: CommandContext) -> LiveOptions:
    """The live restore's arguments, checked (UsageError naming what is wrong)."""
    if args.to is not None or args.output is None:
        raise UsageError("a live restore writes a file: give --output, not --to")
    if args.target_qmp is None:
        raise UsageError("--live needs --target-qmp SOCKET (the QMP socket of the VM to run)")
    if args.force or args.format not in (None, "qcow2"):
        raise UsageError("--live makes a new qcow2 file: --force and --format do not apply")
    if args.resume:
        if args.vm is not None or args.disk is not None or args.backup is not None:
            raise UsageError("--resume takes the VM, backup and disk from the live restore's state")
    elif args.vm is None or args.disk is None:
        raise UsageError("--live needs --vm and --disk (and --backup, else the latest)")
    if args.wait < 0:
        raise UsageError("--wait is a number of seconds, 0 or more")
    return LiveOptions(
        output=live_state.absolute(args.output),
        target=os.path.abspath(args.target_qmp),
        wait=args.wait,
        speed=args.speed,
        quiet=context.quiet,
        config=context.config_path,
    )


async def _start(args: argparse.Namespace, context: CommandContext, opts: LiveOptions) -> None:
    clear_leftover(opts.output)
    config = context.config()
    root = local_repository(config, "restore --live")
    vm = config.vm(args.vm)
    repo = root.vm(vm.name)
    manifest = repo.resolve(args.backup)
    size = check_disk(manifest, args.disk, repo.vm)
    socket = live_state.socket_path(runtime_base(config), opts.output)
    await remove_leftover(opts.output)
    live_state.make_folder(opts.output)
    state = live_state.new_state(
        opts.output, root.root, repo.vm, manifest.id, args.disk, size, socket
    )
    live = LiveRestore(state, opts)
    try:
        live.take_control()
        live_state.save(state)
    except BaseException:
        live.release()
        live_state.remove(opts.output, None)
        raise
    try:
        with vm_key(vm.encryption) as key:
            await live.start(repo, manifest, key)
    finally:
        live.release()


async def _resume(context: CommandContext, opts: LiveOptions) -> None:
    output = opts.output
    if not os.path.lexists(output):
        raise UsageError(f"{output} does not exist: there is no live restore to resume")
    state = live_state.load(output)
    if state is None:
        if backing_file(output) is None:
            log.info("%s is complete: it has no backing file, there is nothing to resume", output)
            return
        raise StateError(
            f"no live restore of {output} to resume: its state folder "
            f"{live_state.state_folder(output)} is gone"
        )
    live = LiveRestore(state, opts)
    live.take_control()
    try:
        await _resume_with(context, live)
    finally:
        live.release()


async def _resume_with(context: CommandContext, live: LiveRestore) -> None:
    state, output = live.state, live.output
    repo: VMRepository | None = None
    manifest: Manifest | None = None
    encryption: Encryption | None = None  # the key, when the point is served again
    if live.served.pid() is None and backing_file(output) is not None:
        config = context.config()  # serve again: the daemon is gone (a reboot?)
        root = local_repository(config, "restore --live")
        if Path(os.path.realpath(root.root)) != Path(os.path.realpath(state.repository)):
            raise UsageError(
                f"the live restore of {output} serves from repository {state.repository}, "
                f"but the configuration names {config.repository}"
            )
        repo = root.vm(state.vm)
        repo.refuse_unfinished_merge()
        manifest = repo.load(state.backup)
        encryption = config.vm(state.vm).encryption
    with vm_key(encryption) as key:
        await live.resume(repo, manifest, key)


async def _main(
    args: argparse.Namespace, context: CommandContext, opts: LiveOptions, interrupt: Interrupt
) -> int:
    try:
        if args.resume:
            await _resume(context, opts)
        else:
            await _start(args, context, opts)
    except asyncio.CancelledError:
        if interrupt.signal is None:
            raise
        log.error("live restore interrupted (%s)", interrupt.name)
        return interrupt.exit_code
    return 0


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    opts = options(args, context)
    return run_interruptible(lambda interrupt: _main(args, context, opts, interrupt))

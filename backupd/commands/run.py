"""``backupd run``: take a backup of one VM or of every configured VM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time

from backupd.backup import RunResult, run_backup
from backupd.commands import CommandContext
from backupd.errors import BackupdError, ExitCode, UsageError
from backupd.logs import log_summary
from backupd.progress import progress_mode
from backupd.repository import Repository
from backupd.status import RunRecord, record_run, write_metrics

NAME = "run"
HELP = "take a backup (incremental when possible, else full)"
DESCRIPTION = """\
Take a point-in-time-consistent backup of a running VM: a full backup the first time,
then incrementals that copy only what changed (qemu's dirty bitmaps).

examples:
  backupd run --vm guest1                 # auto: incremental when possible, else full
  backupd run --vm guest1 --full          # start a new chain
  backupd run --vm guest1 --incremental   # fail instead of falling back to a full
  backupd run --all                       # every configured VM, one after another
"""

log = logging.getLogger("backupd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--vm", help="the VM to back up (a name from the configuration)")
    which.add_argument("--all", action="store_true", help="back up every configured VM")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", help="take a full backup")
    kind.add_argument(
        "--incremental", action="store_true", help="take an incremental backup or fail"
    )


async def _run_one(context: CommandContext, vm_name: str, mode: str) -> int:
    config = context.config()
    vm = config.vm(vm_name)
    result = RunResult(vm.name)
    started = time.time()
    code = ExitCode.OK
    error = ""
    try:
        await run_backup(
            config, vm, mode, progress_mode=progress_mode(context.quiet), result=result
        )
    except BackupdError as exc:
        code, error = exc.exit_code, str(exc)
        log.error("%s: %s", vm.name, exc)
    except asyncio.CancelledError:
        code, error = ExitCode.FAILED, "interrupted"
        log.error("%s: backup interrupted; nothing was committed", vm.name)
    except OSError as exc:
        code = ExitCode.FAILED
        error = f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
        log.error("%s: %s", vm.name, error)
    except Exception as exc:  # a bug: still one line and a summary
        code, error = ExitCode.FAILED, f"internal error: {type(exc).__name__}: {exc}"
        log.error("%s: %s", vm.name, error)
        log.debug("details", exc_info=True)
    duration = time.time() - started
    manifest = result.manifest
    plan = result.plan
    log_summary(
        log,
        vm=vm.name,
        backup=manifest.id if manifest else None,
        kind=plan.kind if plan else "-",
        reason=plan.reason if plan else error,
        disks=result.disks,
        copied=manifest.bytes_copied if manifest else 0,
        duration=duration,
        result="ok" if code == ExitCode.OK else "failed",
    )
    if code != ExitCode.BUSY:  # a refused run did not happen; keep the holder's record
        try:
            record_run(
                Repository(config.repository).vm(vm.name),
                RunRecord(
                    vm=vm.name,
                    result="ok" if code == ExitCode.OK else "failed",
                    started=started,
                    duration=round(duration, 3),
                    backup=manifest.id if manifest else None,
                    kind=plan.kind if plan else None,
                    reason=plan.reason if plan else "",
                    bytes=manifest.bytes_copied if manifest else 0,
                    disks={d.name: d.bytes_copied for d in manifest.disks.values()}
                    if manifest
                    else {},
                    error=error,
                ),
            )
            write_metrics(config)
        except OSError as exc:
            log.warning("%s: could not record the run's status: %s", vm.name, exc)
    return int(code)


async def _main(args: argparse.Namespace, context: CommandContext) -> int:
    mode = "full" if args.full else "incremental" if args.incremental else "auto"
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    names = sorted(context.config().vms) if args.all else [args.vm]
    if args.all and not names:
        raise UsageError("the configuration has no VMs")
    worst = 0
    try:
        for name in names:
            code = await _run_one(context, name, mode)
            worst = code if worst == 0 else worst
    except asyncio.CancelledError:
        return int(ExitCode.FAILED)
    return worst


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    context.config()  # configuration errors before anything else
    return asyncio.run(_main(args, context))

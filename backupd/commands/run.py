"""``backupd run``: take a backup of one VM or of every configured VM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from backupd.backup import RunResult, run_backup
from backupd.commands import CommandContext
from backupd.config import Config, VMConfig
from backupd.errors import BackupdError, ExitCode, UsageError, one_line, os_error_text
from backupd.interrupt import Interrupt, run_interruptible
from backupd.logs import Outcome, log_summary
from backupd.planning import Mode
from backupd.progress import progress_mode
from backupd.status import RunRecord, record_run, write_metrics
from backupd.storage.repositories import repository_for

NAME = "run"
#: SIGINT/SIGTERM stay blocked until the event loop handles them (see Interrupt)
HANDLES_SIGNALS = True
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


async def _attempt(
    context: CommandContext, vm: VMConfig, mode: Mode, interrupt: Interrupt, result: RunResult
) -> tuple[int, str]:
    """Run the backup; (exit code, error line) of how it ended, logged."""
    try:
        await run_backup(
            context.config(), vm, mode, progress_mode=progress_mode(context.quiet), result=result
        )
    except asyncio.CancelledError:
        if result.manifest is not None:
            log.warning(
                "%s: interrupted (%s) after backup %s was committed; the next run removes "
                "the old bitmaps",
                vm.name,
                interrupt.name,
                result.manifest.id,
            )
        else:
            log.error("%s: backup interrupted (%s); nothing was committed", vm.name, interrupt.name)
        return interrupt.exit_code, f"interrupted ({interrupt.name})"
    except Exception as exc:
        code, error = one_line(exc)
        log.error("%s: %s", vm.name, error)
        if not isinstance(exc, (BackupdError, OSError)):
            log.debug("details", exc_info=True)
        return code, error
    return ExitCode.OK, ""


def _record(config: Config, result: RunResult, started: float, error: str) -> None:
    """The run's status file and the metrics textfile."""
    manifest, plan = result.manifest, result.plan
    try:
        record_run(
            repository_for(config).vm(result.vm),
            RunRecord(
                vm=result.vm,
                result=Outcome.OK if manifest is not None else Outcome.FAILED,
                started=started,
                duration=round(time.time() - started, 3),
                backup=manifest.id if manifest else None,
                kind=plan.kind if plan else None,
                reason=plan.reason if plan else "",
                bytes=manifest.bytes_copied if manifest else 0,
                disks={d.name: d.bytes_copied for d in manifest.disks.values()} if manifest else {},
                error=error,
                consistency=result.consistency if manifest else None,
                source=result.source,
            ),
        )
        write_metrics(config)
    except OSError as exc:
        log.warning("%s: could not record the run's status: %s", result.vm, os_error_text(exc))
    except BackupdError as exc:  # e.g. object storage unreachable
        log.warning("%s: could not record the run's status: %s", result.vm, exc)


async def _run_one(context: CommandContext, vm_name: str, mode: Mode, interrupt: Interrupt) -> int:
    config = context.config()
    vm = config.vm(vm_name)
    result = RunResult(vm.name)
    started = time.time()
    code, error = await _attempt(context, vm, mode, interrupt, result)
    manifest, plan = result.manifest, result.plan
    log_summary(
        log,
        vm=vm.name,
        backup=manifest.id if manifest else None,
        kind=plan.kind if plan else "-",
        reason=plan.reason if plan else error,
        disks=result.disks,
        copied=manifest.bytes_copied if manifest else 0,
        consistency=result.consistency if manifest else "-",
        duration=time.time() - started,
        result=Outcome.OK
        if code == ExitCode.OK
        else Outcome.INTERRUPTED
        if interrupt.signal
        else Outcome.FAILED,
        source=result.source or "-",
    )
    if code != ExitCode.BUSY:  # a refused run did not happen; keep the holder's record
        _record(config, result, started, error)
    return int(code)


async def _main(args: argparse.Namespace, context: CommandContext, interrupt: Interrupt) -> int:
    mode = Mode.FULL if args.full else Mode.INCREMENTAL if args.incremental else Mode.AUTO
    names = sorted(context.config().vms) if args.all else [args.vm]
    if args.all and not names:
        raise UsageError("the configuration has no VMs")
    worst = 0
    for name in names:
        code = await _run_one(context, name, mode, interrupt)
        worst = code if worst == 0 else worst
        if interrupt.signal:
            break
    return worst


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    context.config()  # configuration errors before anything else
    return run_interruptible(lambda interrupt: _main(args, context, interrupt))

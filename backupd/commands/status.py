"""``backupd status``: last success, its age, last result, chain length, bytes stored."""

from __future__ import annotations

import argparse
import json
import time

from backupd.commands import CommandContext
from backupd.logs import human_age, human_bytes
from backupd.status import vm_status

NAME = "status"
DESCRIPTION = """\
Per VM: the last successful backup and its age, the last run's result, the chain
length and the bytes stored.  --json for monitoring (alert on age_seconds).

examples:
  backupd status
  backupd status --vm guest1 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", help="only this VM")
    parser.add_argument("--json", action="store_true")


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    names = [config.vm(args.vm).name] if args.vm else sorted(config.vms)
    now = time.time()
    rows = [vm_status(config, name, now) for name in names]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        age = r["age_seconds"]
        if age is None:
            success = "never"
        else:
            consistency = r["last_success_consistency"] or "consistency unknown"
            offline = ", offline" if r["last_success_source"] == "offline" else ""
            success = f"{r['last_success']} ({human_age(age)} ago, {consistency}{offline})"
        print(
            f"{r['vm']}: last success {success}, "
            f"last run {r['last_result'] or '-'}, chain {r['chain_length']}, "
            f"{r['backups']} backups, {human_bytes(r['repository_bytes'])} stored"
        )
    return 0

"""``backupd list``: the backups of one or every VM."""

from __future__ import annotations

import argparse
import json
from typing import Any

from backupd.commands import CommandContext
from backupd.errors import BackupdError, RepositoryError
from backupd.logs import human_bytes
from backupd.merge.journal import read_journal
from backupd.storage.repositories import repository_for
from backupd.storage.vmrepo import VMRepo

NAME = "list"
DESCRIPTION = """\
List the backups in the repository: id, kind, parent, creation time (UTC), disks,
bytes stored and status.

examples:
  backupd list
  backupd list --vm guest1 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", help="only this VM")
    parser.add_argument("--json", action="store_true", help="print a JSON array")


def _damaged(vm: str, backup: str | None, exc: BackupdError) -> dict[str, Any]:
    return {
        "id": backup,
        "vm": vm,
        "kind": None,
        "parent": None,
        "created": None,
        "disks": [],
        "bytes": 0,
        "quiesced": False,
        "source": None,
        "status": f"damaged: {exc}",
    }


def _merging(repo: VMRepo) -> dict[str, str]:
    """The backups an interrupted merge is changing, and how (until prune finishes it)."""
    try:
        journal = read_journal(repo)
    except RepositoryError:
        return {}
    if journal is None:
        return {}
    return {
        backup: f"interrupted merge: {journal.plan.action(backup)} (run prune to finish)"
        for backup in (*journal.plan.dropped, *(f.target for f in journal.plan.folds))
    }


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    names = [config.vm(args.vm).name] if args.vm else sorted(config.vms)
    rows: list[dict[str, Any]] = []
    for name in names:
        repo = repository_for(config).vm(name)
        try:
            ids = repo.ids()
        except RepositoryError as exc:  # the VM's folder itself is not a folder
            rows.append(_damaged(name, None, exc))
            continue
        merging = _merging(repo)
        for backup in ids:
            try:
                m = repo.load(backup)
            except BackupdError as exc:
                rows.append(_damaged(name, backup, exc))
                continue
            rows.append(
                {
                    "id": m.id,
                    "vm": name,
                    "kind": m.kind,
                    "parent": m.parent,
                    "created": m.created,
                    "disks": sorted(m.disks),
                    "bytes": m.bytes_stored,
                    "quiesced": m.quiesced,
                    "source": m.source,
                    "status": merging.get(m.id, m.status),
                }
            )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no backups")
        return 0
    header = ("VM", "ID", "KIND", "PARENT", "CREATED", "STORED", "DISKS", "STATUS")
    table = [
        (
            r["vm"],
            r["id"] or "-",
            r["kind"] or "-",
            r["parent"] or "-",
            r["created"] or "-",
            human_bytes(int(r["bytes"])),
            ",".join(r["disks"]) or "-",
            r["status"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        cells = [
            cell.rjust(width) if column == "STORED" else cell.ljust(width)
            for column, cell, width in zip(header, row, widths, strict=True)
        ]
        print("  ".join(cells).rstrip())
    return 0

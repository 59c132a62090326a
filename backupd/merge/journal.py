"""The merge journal (``<vm>/.merge.json``): what a prune set out to do, and how far it
got, so that a kill at any instant is finished by the next prune, merge or run.

Written (atomically, durably) before the first file changes and after every step that
cannot be taken back; removed when everything is done.  While it exists the backups it
drops are no longer points in time (their files are being changed): the repository
hides them, and a command asked for one says which merge it belongs to.  In the *swap*
state a kept backup's files and manifest are being exchanged: reading commands wait
for the merge to be finished (one clear line says how).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from backupd.errors import RepositoryError
from backupd.merge.plan import Direction, Fold, MergePlan
from backupd.names import is_backup_id
from backupd.storage.vmrepo import MERGE_JOURNAL, VMRepo

JOURNAL = MERGE_JOURNAL


class State(Enum):
    FOLD = "fold"  # copying data (redone from the start when interrupted)
    SWAP = "swap"  # the new manifest is written; files and manifest being exchanged
    REMOVE = "remove"  # every fold done; the dropped backups being removed


@dataclass
class Journal:
    plan: MergePlan
    #: folds finished (by index in plan.folds)
    done: list[int] = field(default_factory=list)
    state: State = State.FOLD

    @property
    def current(self) -> int | None:
        pending = [i for i in range(len(self.plan.folds)) if i not in self.done]
        return pending[0] if pending else None

    def to_json(self) -> bytes:
        plan = self.plan
        data = {
            "keep": list(plan.keep),
            "remove": list(plan.remove),
            "folds": [
                {
                    "direction": f.direction.value,
                    "target": f.target,
                    "folded": list(f.folded),
                    "parent": f.parent,
                }
                for f in plan.folds
            ],
            "done": self.done,
            "state": self.state.value,
        }
        return (json.dumps(data, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Journal:
        try:
            data = json.loads(raw)
            return cls._parse(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"damaged merge journal {where}: {exc}") from None

    @staticmethod
    def _ids(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(
            isinstance(b, str) and is_backup_id(b) for b in value
        ):
            raise ValueError("a list of backup ids is expected")
        return tuple(value)

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> Journal:
        folds = []
        for f in data["folds"]:
            parent = f["parent"]
            if parent is not None and not (isinstance(parent, str) and is_backup_id(parent)):
                raise ValueError(f"bad parent {parent!r}")
            (target,) = cls._ids([f["target"]])
            folds.append(Fold(Direction(f["direction"]), target, cls._ids(f["folded"]), parent))
        plan = MergePlan(cls._ids(data["keep"]), tuple(folds), cls._ids(data["remove"]))
        done = data["done"]
        if not isinstance(done, list) or not all(
            type(i) is int and 0 <= i < len(folds) for i in done
        ):
            raise ValueError("bad list of finished folds")
        return cls(plan, list(done), State(data["state"]))


def read_journal(repo: VMRepo) -> Journal | None:
    raw = repo.read_own_file(JOURNAL)
    return None if raw is None else Journal.from_json(raw, f"{repo.where}/{repo.vm}/{JOURNAL}")


def write_journal(repo: VMRepo, journal: Journal) -> None:
    repo.write_own_file(JOURNAL, journal.to_json())


def clear_journal(repo: VMRepo) -> None:
    repo.remove_own_file(JOURNAL)

"""Which backups a prune keeps, folds into a kept one, or removes: pure, from the parent
links of the manifests and the set the retention policy selects.

Within one chain (a full and the incrementals on top of it, oldest first):

- the backups below the chain's oldest kept one are folded *down* into it: their data
  and its own end up in the full's file, which becomes that kept backup's file (it
  becomes a full, with no parent);
- dropped backups between two kept ones are folded *up* into the upper one: what it
  needs of them is copied into its own file, which is then backed by the lower kept one;
- dropped backups above the newest kept one are removed (no kept backup needs them),
  and so is a chain with nothing kept.

Afterwards the repository holds exactly the backups the policy selected.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from backupd.errors import ChainError


class Direction(Enum):
    DOWN = "down"  # into the oldest kept backup of a chain, which becomes a full
    UP = "up"  # into a kept backup above dropped ones, re-backed by the kept one below


@dataclass(frozen=True, slots=True)
class Fold:
    direction: Direction
    #: the kept backup that receives the data
    target: str
    #: the dropped backups folded into it, oldest first
    folded: tuple[str, ...]
    #: the target's parent afterwards (None: it becomes a full)
    parent: str | None


@dataclass(frozen=True, slots=True)
class MergePlan:
    keep: tuple[str, ...]
    folds: tuple[Fold, ...]
    #: dropped backups that no kept backup needs: removed, nothing folded
    remove: tuple[str, ...]

    @property
    def dropped(self) -> tuple[str, ...]:
        """Every backup that is gone afterwards."""
        return tuple(sorted({b for f in self.folds for b in f.folded} | set(self.remove)))

    def action(self, backup: str) -> str:
        """What happens to ``backup``: keep, remove, or merge into X (for ``--dry-run``)."""
        for fold in self.folds:
            if backup in fold.folded:
                return f"merge into {fold.target}"
            if backup == fold.target:
                return (
                    "keep (becomes a full)"
                    if fold.parent is None
                    else (f"keep (now on {fold.parent})")
                )
        return "keep" if backup in self.keep else "remove"

    @property
    def changes(self) -> bool:
        return bool(self.folds or self.remove)


def _chains(parents: Mapping[str, str | None]) -> list[list[str]]:
    """The chains, each oldest first (ChainError when one backup has two children)."""
    children: dict[str, str] = {}
    for backup, parent in sorted(parents.items()):
        if parent is None:
            continue
        if parent not in parents:
            raise ChainError(f"backup {backup} needs missing parent {parent}")
        if parent in children:
            raise ChainError(
                f"backups {children[parent]} and {backup} both build on {parent}: "
                "merging needs one line of backups per chain (see backupd verify)"
            )
        children[parent] = backup
    chains = []
    for full in sorted(b for b, p in parents.items() if p is None):
        chain = [full]
        while chain[-1] in children:
            chain.append(children[chain[-1]])
        chains.append(chain)
    stray = set(parents) - {b for chain in chains for b in chain}
    if stray:  # parents that loop never reach a full
        raise ChainError(f"backups {', '.join(sorted(stray))} do not lead to a full backup")
    return chains


def plan_merges(parents: Mapping[str, str | None], keep: Collection[str]) -> MergePlan:
    """The folds and removals that leave exactly ``keep`` (a subset of the backups)."""
    folds: list[Fold] = []
    remove: list[str] = []
    for chain in _chains(parents):
        kept = [i for i, backup in enumerate(chain) if backup in keep]
        if not kept:
            remove += chain
            continue
        if kept[0] > 0:
            folds.append(Fold(Direction.DOWN, chain[kept[0]], tuple(chain[: kept[0]]), None))
        for lower, upper in itertools.pairwise(kept):
            if upper > lower + 1:
                folds.append(
                    Fold(Direction.UP, chain[upper], tuple(chain[lower + 1 : upper]), chain[lower])
                )
        remove += chain[kept[-1] + 1 :]
    return MergePlan(tuple(sorted(keep)), tuple(folds), tuple(sorted(remove)))

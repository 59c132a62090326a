"""Merging in a bucket (placeholder)."""

from __future__ import annotations

from backupd.errors import RepositoryError
from backupd.merge.fold import FoldResult
from backupd.merge.plan import Fold
from backupd.storage.vmrepo import VMRepo


class _Steps:
    def check_fold(self, repo: VMRepo, what: Fold) -> None:
        raise RepositoryError("not yet")

    async def fold(self, repo: VMRepo, what: Fold, resumed: bool = False) -> FoldResult:
        raise RepositoryError("not yet")

    def exchange(self, repo: VMRepo, what: Fold) -> None:
        raise RepositoryError("not yet")

    def remove(self, repo: VMRepo, backup: str) -> None:
        raise RepositoryError("not yet")


STEPS = _Steps()

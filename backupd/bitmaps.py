"""The names of backupd's checkpoint bitmaps in qemu, and whose each one is.

On every disk a persistent dirty bitmap ``backupd-<repository>-<backup>`` records what
changed since that backup of that repository.  The repository part (a short random id
stored in the repository, see :meth:`backupd.repository.Repository.identity`) lets
several repositories keep their own chains of one VM (say a local one and an off-site
one): a run only ever removes its own repository's bitmaps.

Bitmaps named ``backupd-<backup>`` were written before repositories had ids.  One is
still taken as a chain's parent when it names the newest backup (so an upgrade does not
force a full), and removed once its successor is committed; others are left alone,
since their repository cannot be told.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "backupd-"
#: the frozen copy of the parent's bitmap on the fleecing view (temporary, never stored)
EXPORT_BITMAP = "backupd-export"
_LEGACY = re.compile(r"backupd-\d{8}T\d{6}Z")


@dataclass(frozen=True, slots=True)
class CheckpointNames:
    """The bitmap names of one repository."""

    repository: str

    def name(self, backup: str) -> str:
        return f"{PREFIX}{self.repository}-{backup}"

    @staticmethod
    def legacy(backup: str) -> str:
        return f"{PREFIX}{backup}"

    def candidates(self, backup: str) -> tuple[str, str]:
        """The names ``backup``'s bitmap may have, the current form first."""
        return self.name(backup), self.legacy(backup)

    def owns(self, name: str) -> bool:
        """A bitmap this repository made (a run may remove it)."""
        return name.startswith(f"{PREFIX}{self.repository}-")

    @staticmethod
    def is_legacy(name: str) -> bool:
        return _LEGACY.fullmatch(name) is not None

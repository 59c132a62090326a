"""Names that become paths: VM names, disk names and backup ids.

The configuration, the repository and the manifests all name things that end up as
folder and file names (``<repository>/<vm>/<backup-id>/<disk>.qcow2``), so one set of
rules decides what a name may be: letters, digits, ``.``, ``_`` and ``-``, starting with
a letter or digit, no ``..``, at most 128 characters; backup ids are UTC times like
``20261124T030000Z``.  Whole-string matches only (``fullmatch``: a trailing newline is
not a name).  Each caller says which error a bad name is (a bad name in the
configuration is a configuration error, one in a manifest is a damaged repository).
"""

from __future__ import annotations

import re

from backupd.errors import BackupdError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
BACKUP_ID_RE = re.compile(r"\d{8}T\d{6}Z")


def is_name(name: object) -> bool:
    """A VM or disk name that is safe as one path component."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def is_backup_id(text: object) -> bool:
    return isinstance(text, str) and BACKUP_ID_RE.fullmatch(text) is not None


def check_name(kind: str, name: object, error: type[BackupdError]) -> str:
    """``name`` when it is a valid ``kind`` name (VM, disk), else ``error`` saying why."""
    if not is_name(name):
        raise error(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' "
            "(no '/' and no '..')"
        )
    assert isinstance(name, str)
    return name

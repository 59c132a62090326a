"""The names backupd gives what it adds to qemu and to the scratch folder during a run.

Nodes, jobs and exports carry a ``backupd-`` prefix and the index of their disk in the
run, so the next run finds what a killed one left (see :mod:`.recovery`) without any
record of it; only what qemu cannot tell afterwards goes into the state file.
"""

from __future__ import annotations

SCRATCH_PREFIX = "backupd-scratch-"
JOB_PREFIX = "backupd-job-"
CBW_PREFIX = "backupd-cbw-"
ACCESS_PREFIX = "backupd-snap-"
EXPORT_PREFIX = "backupd-export-"
#: what a killed run must undo that qemu cannot tell us: a paused VM, redirected devices
STATE_FILE = "session.json"
#: the suffixes of scratch files (qcow2 for blockdev-backup, raw for snapshot-access)
SCRATCH_SUFFIXES = (".qcow2", ".raw")


def scratch_node(index: int) -> str:
    """The node on the scratch file: the old contents of overwritten clusters go there."""
    return f"{SCRATCH_PREFIX}{index}"


def filter_node(index: int) -> str:
    """The copy-before-write filter in front of the disk."""
    return f"{CBW_PREFIX}{index}"


def access_node(index: int) -> str:
    """The snapshot-access node: the disk as it was at the point in time."""
    return f"{ACCESS_PREFIX}{index}"


def job_id(index: int) -> str:
    """The ``blockdev-backup sync=none`` job."""
    return f"{JOB_PREFIX}{index}"


def export_id(index: int) -> str:
    """The NBD export of the view (its NBD name is the disk's name)."""
    return f"{EXPORT_PREFIX}{index}"


def scratch_file(backup_id: str, disk: str, suffix: str) -> str:
    """The name of a disk's scratch file in the scratch folder."""
    return f"{backup_id}-{disk}{suffix}"

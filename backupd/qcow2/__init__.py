"""qcow2 files written by backupd: a streaming, write-once qcow2 v3 writer."""

from backupd.qcow2.writer import Qcow2Stats, Qcow2Writer

__all__ = ["Qcow2Stats", "Qcow2Writer"]

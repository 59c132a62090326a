"""backupd: incremental, point-in-time-consistent backups of running qemu VMs.

backupd drives qemu over QMP (persistent dirty bitmaps, a copy-before-write fleecing
view of each disk, qemu's own NBD server), reads the disks with :mod:`nbdclient`, and
writes every backup as a plain qcow2 file whose backing file is the previous backup.
"""

__version__ = "0.1.0"

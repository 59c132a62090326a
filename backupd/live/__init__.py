"""Live restore: a VM boots from a served backup at once, and qemu copies every cluster
into its new disk file while the guest runs (``backupd restore --live``).

``flow`` runs one from start to end and decides what a failure or a signal leaves;
``served`` is the detached qemu-storage-daemon that serves the point; ``overlay`` the
output (a qcow2 whose backing file is the served point); ``target`` the VM's qemu and
its copy job; ``state`` what a ``--resume`` needs; ``command`` the command line.
"""

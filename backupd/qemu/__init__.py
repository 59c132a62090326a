"""Everything backupd asks of qemu: QMP, the disk inventory, fleecing exports, the guest agent."""

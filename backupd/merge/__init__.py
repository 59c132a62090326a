"""Merging: prune without another full read of the VM.

A prune folds the backups its policy drops into the kept ones (:mod:`.plan`), with
``qemu-img commit``/``rebase`` doing the copying, so the cost follows the merged data,
not the disk (:mod:`.fold`), the digests stay true (:mod:`.records`), and a journal
(:mod:`.journal`) lets the next prune, merge or run finish what a kill interrupted
(:mod:`.execute`).  Every backup stays a standard qcow2 file.
"""

from backupd.merge.execute import apply, finish
from backupd.merge.journal import read_journal
from backupd.merge.plan import Direction, Fold, MergePlan, plan_merges

__all__ = ["Direction", "Fold", "MergePlan", "apply", "finish", "plan_merges", "read_journal"]

"""Full or incremental, and the reason."""

from __future__ import annotations

import pytest

from backupd.bitmaps import CheckpointNames
from backupd.errors import BackupFailed
from backupd.manifest import DiskRecord, Manifest
from backupd.planning import plan_backup
from backupd.qemu.inventory import Bitmap, Disk

ID = "20261124T030000Z"
NAMES = CheckpointNames("0a1b2c3d")


def manifest(disks: dict[str, int]) -> Manifest:
    return Manifest(
        id=ID,
        vm="g",
        kind="full",
        parent=None,
        created="2026-11-24T03:00:00Z",
        qemu_version="7.2.22",
        reason="",
        quiesced=False,
        duration=1.0,
        disks={n: DiskRecord(n, f"{n}.qcow2", n, s, 65536, 0, 0, 0, 0) for n, s in disks.items()},
    )


def disk(name: str, size: int = 1 << 20, bitmap_name: str = NAMES.name(ID), **bitmap: bool) -> Disk:
    state = {"recording": True, "persistent": True, "inconsistent": False} | bitmap
    bitmaps = (
        ()
        if bitmap.get("missing")
        else (
            Bitmap(
                bitmap_name,
                state["recording"],
                False,
                state["persistent"],
                state["inconsistent"],
                65536,
                0,
            ),
        )
    )
    return Disk(name, f"drive-{name}", "qcow2", "/x", size, False, "/machine/peripheral/x", bitmaps)


def test_incremental_when_everything_lines_up() -> None:
    plan = plan_backup("auto", manifest({"vda": 1 << 20}), 3, [disk("vda")], 14, NAMES)
    assert plan.kind == "incremental" and plan.parent is not None
    assert plan.parent_bitmap == f"backupd-0a1b2c3d-{ID}"


def test_bitmap_from_before_repository_ids_continues_the_chain() -> None:
    disks = [disk("vda", bitmap_name=f"backupd-{ID}"), disk("vdb", bitmap_name=f"backupd-{ID}")]
    plan = plan_backup("auto", manifest({"vda": 1 << 20, "vdb": 1 << 20}), 1, disks, 14, NAMES)
    assert plan.kind == "incremental" and plan.parent_bitmap == f"backupd-{ID}"


def test_another_repositorys_bitmap_is_not_ours() -> None:
    other = [disk("vda", bitmap_name=f"backupd-ffffffff-{ID}")]
    plan = plan_backup("auto", manifest({"vda": 1 << 20}), 1, other, 14, NAMES)
    assert plan.kind == "full" and f"backupd-0a1b2c3d-{ID} is missing" in plan.reason
    assert NAMES.owns(f"backupd-0a1b2c3d-{ID}") and not NAMES.owns(f"backupd-ffffffff-{ID}")
    assert NAMES.is_legacy(f"backupd-{ID}") and not NAMES.is_legacy(f"backupd-{ID}\n")


@pytest.mark.parametrize(
    ("latest", "chain", "disks", "reason"),
    [
        (None, 0, [disk("vda")], "no committed backup yet"),
        (manifest({"vda": 1 << 20}), 14, [disk("vda")], "max_chain (14"),
        (manifest({"vda": 1 << 20}), 0, [disk("vda"), disk("vdb")], "disk set changed"),
        (manifest({"vda": 1 << 20}), 0, [disk("vda", 2 << 20)], "was resized"),
        (manifest({"vda": 1 << 20}), 0, [disk("vda", missing=True)], "is missing"),
        (manifest({"vda": 1 << 20}), 0, [disk("vda", inconsistent=True)], "inconsistent"),
        (manifest({"vda": 1 << 20}), 0, [disk("vda", recording=False)], "not recording"),
    ],
)
def test_full_with_a_reason(
    latest: Manifest | None, chain: int, disks: list[Disk], reason: str
) -> None:
    plan = plan_backup("auto", latest, chain, disks, 14, NAMES)
    assert plan.kind == "full" and reason in plan.reason
    with pytest.raises(BackupFailed, match="incremental backup is not possible"):
        plan_backup("incremental", latest, chain, disks, 14, NAMES)


def test_forced_full() -> None:
    plan = plan_backup("full", manifest({"vda": 1 << 20}), 1, [disk("vda")], 14, NAMES)
    assert plan.kind == "full" and plan.parent is None


def test_a_raw_image_is_always_a_full_backup_and_says_so() -> None:
    raw = Disk("vdb", "backupd-image-1", "raw", "/x", 1 << 20, True, None)
    for latest in (None, manifest({"vda": 1 << 20, "vdb": 1 << 20})):
        plan = plan_backup("auto", latest, 1, [disk("vda"), raw], 14, NAMES)
        assert plan.kind == "full"
        assert plan.reason == (
            "disk vdb is a raw image, which holds no dirty bitmaps: only full backups"
        )
    with pytest.raises(BackupFailed, match="not possible: disk vdb is a raw image"):
        plan_backup("incremental", manifest({"vdb": 1 << 20}), 1, [raw], 14, NAMES)

"""Where a repository lives: s3:// locations, the part layout of uploads, and the
commands that work on local repositories only (what they say about a bucket)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backupd.errors import ConfigError
from backupd.objectstore.objects import MAX_PARTS, MIN_PART
from backupd.storage.location import S3Location, parse_location
from backupd.storage.s3stage import UPLOAD_MEMORY, part_layout

MiB = 1 << 20
GiB = 1 << 30


def test_locations() -> None:
    base = Path("/etc/backupd")
    assert parse_location("s3://backups/site-a/hv1/", base) == S3Location("backups", "site-a/hv1")
    assert parse_location("s3://backups", base) == S3Location("backups", "")
    assert S3Location("b", "p/q").key("vm", "id", "vda.qcow2") == "p/q/vm/id/vda.qcow2"
    assert S3Location("b", "").folder("vm") == "vm/"
    assert parse_location("repo", base) == base / "repo"
    assert parse_location("/srv/repo", base) == Path("/srv/repo")
    for bad in ("s3://", "s3://b/../x", "s3://bucket/a//b", "s3://bu*cket/x", "s3://b/a/\x01"):
        with pytest.raises(ConfigError):
            parse_location(bad, base)


@pytest.mark.parametrize("disks", [1, 2, 4, 16])
def test_part_layout_stays_in_memory_and_in_s3_rules(disks: int) -> None:
    layout = part_layout(2 * GiB, disks)
    assert layout.part_size >= MIN_PART and layout.part_size % MiB == 0
    held = layout.part_size * (layout.window + layout.concurrency) + MIN_PART  # + first part
    # within the run's share, or (many disks) two parts and the first at the least
    assert held <= max(UPLOAD_MEMORY // disks, 3 * MIN_PART), layout


def test_a_huge_object_gets_parts_large_enough_for_10000() -> None:
    expected = 8 << 40  # 8 TiB of data
    layout = part_layout(expected)
    assert layout.part_size * (MAX_PARTS - 100) >= expected
    assert (layout.window, layout.concurrency) == (1, 1)


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backupd", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_local_only_commands_refuse_a_bucket_in_one_line(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text("x" * 64)
    key.chmod(0o400)
    config = tmp_path / "backupd.yaml"
    config.write_text(
        "repository: s3://backups/site-a\n"
        f"runtime_dir: {tmp_path / 'run'}\n"
        f"encryption: {{key_file: {key}}}\n"
        "vms: {guest1: {qmp: /nonexistent.qmp}}\n"
    )
    new_key = tmp_path / "new.key"
    new_key.write_text("y" * 64)
    new_key.chmod(0o400)
    rekey = run(config, "rekey", "--vm", "guest1", "--new-key-file", str(new_key))
    output, target = str(tmp_path / "vda.qcow2"), str(tmp_path / "q")
    live = run(config, "restore", "--live", "--vm", "guest1", "--disk", "vda",
               "--output", output, "--target-qmp", target)  # fmt: skip
    for result, what in ((rekey, "backupd rekey"), (live, "restore --live")):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{what} works on a local repository only, not on s3://backups/site-a" in lines[0]
    assert not (tmp_path / "vda.qcow2").exists()

"""Private folders and files: what another local user could plant is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupd.errors import ConfigError
from backupd.private import create_exclusive, private_dir, read_private, write_private


def test_missing_folders_are_made_0700_one_by_one(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    assert private_dir(target, "scratch_dir") == target
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "scratch").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="is not a folder"):
        private_dir(tmp_path / "scratch", "scratch_dir")


def test_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="can be written by other users"):
        private_dir(shared, "scratch_dir")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        private_dir(theirs, "scratch_dir")


def test_files_are_created_exclusively_and_never_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "planted").symlink_to(victim)
    with pytest.raises(FileExistsError):
        create_exclusive(tmp_path / "planted")
    assert read_private(tmp_path / "planted") is None  # not followed
    write_private(tmp_path / "state.json", "{}")
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600
    assert read_private(tmp_path / "state.json") == "{}"
    write_private(tmp_path / "planted", "{}")  # replaces the link, not its target
    assert victim.read_text() == "keep me" and not (tmp_path / "planted").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted", "state.json", "victim"]

"""The scratch folder: scratch files made exclusively, the session state file (written
atomically, read defensively), and the "scratch area full" diagnosis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

from backupd.errors import QemuError
from backupd.qemu.fleece.names import STATE_FILE
from backupd.qemu.fleece.scratch import (
    SessionState,
    create_sparse,
    leftover_files,
    read_state,
    remove_state,
    scratch_full,
    write_state,
)


def test_state_round_trip(tmp_path: Path) -> None:
    state = SessionState(paused=True, redirects=(("/machine/peripheral/vda/virtio-backend", "d0"),))
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state
    assert state.original("/machine/peripheral/vda/virtio-backend") == "d0"
    assert state.original("/machine/peripheral/vdb/virtio-backend") is None
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left
    remove_state(tmp_path)
    assert read_state(tmp_path) == SessionState()


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1, 2]", '{"paused": 1, "redirects": [["a"], "b", ["c", "d"], 7]}'],
)
def test_a_damaged_state_file_reads_as_little_as_it_says(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    state = read_state(tmp_path)
    if "redirects" in text:
        assert state == SessionState(paused=True, redirects=(("c", "d"),))
    else:
        assert state == SessionState()


def test_a_state_file_planted_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"paused": true}')
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / STATE_FILE).symlink_to(elsewhere)
    assert read_state(folder) == SessionState()


def test_scratch_files_are_new_sparse_files(tmp_path: Path) -> None:
    path = tmp_path / "b-vda.raw"
    create_sparse(path, 1 << 30)
    assert path.stat().st_size == 1 << 30 and path.stat().st_blocks == 0
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(QemuError, match=r"cannot create scratch file .*b-vda\.raw: File exists"):
        create_sparse(path, 1 << 20)
    target = tmp_path / "victim"
    os.symlink(target, tmp_path / "b-vdb.raw")
    with pytest.raises(QemuError, match="File exists"):
        create_sparse(tmp_path / "b-vdb.raw", 1 << 20)
    assert not target.exists()


def test_leftover_files(tmp_path: Path) -> None:
    assert leftover_files(tmp_path / "missing") == []
    for name in ("x.qcow2", "y.raw", "z.json", "qcow2"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in leftover_files(tmp_path)) == ["x.qcow2", "y.raw"]


class Usage(NamedTuple):
    total: int
    used: int
    free: int


def test_a_full_scratch_area_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "backupd.qemu.fleece.scratch.shutil.disk_usage", lambda path: Usage(1 << 30, 1 << 30, 4096)
    )
    why = scratch_full(tmp_path)
    assert why is not None and why.startswith(f"the scratch area {tmp_path} is full (4096 bytes")
    monkeypatch.setattr(
        "backupd.qemu.fleece.scratch.shutil.disk_usage", lambda path: Usage(1 << 30, 0, 8 << 20)
    )
    assert scratch_full(tmp_path) is None

"""The repository side of an untrusted repository: symlinks and special files are
refused, never followed; chain walks end; a damaged newest backup is skipped with its
reason; a clock behind the newest backup costs nothing; names are whole-string checked."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backupd.chain import chain_files
from backupd.config import parse_config
from backupd.errors import (
    ChainError,
    ConfigError,
    NotFoundError,
    RepositoryError,
    UsageError,
)
from backupd.merge.plan import plan_merges
from backupd.repository import Repository, VMRepository
from tests.backupd.crafted import FULL, INCREMENTAL, VM, base_chain


@pytest.fixture
def repo(tmp_path: Path) -> VMRepository:
    repository = Repository(tmp_path / "repo").vm(VM)
    base_chain(repository.path)
    return repository


@pytest.fixture
def outside(tmp_path: Path, repo: VMRepository) -> Path:
    """A copy of the VM's backups outside the repository: what a symlink points to."""
    target = tmp_path / "outside"
    shutil.copytree(repo.path, target / VM, symlinks=True)
    return target


def test_a_sound_chain_loads(repo: VMRepository) -> None:
    assert repo.ids() == [FULL, INCREMENTAL]
    assert [m.id for m in repo.chain(INCREMENTAL)] == [FULL, INCREMENTAL]
    files = chain_files(repo, repo.load(INCREMENTAL), "vda")
    assert files == [repo.path / FULL / "vda.qcow2", repo.path / INCREMENTAL / "vda.qcow2"]


def test_backup_folder_symlink_is_refused(repo: VMRepository, outside: Path) -> None:
    shutil.rmtree(repo.path / INCREMENTAL)
    (repo.path / INCREMENTAL).symlink_to(outside / VM / INCREMENTAL)
    assert repo.ids() == [FULL, INCREMENTAL]  # listed, so that it is reported as damaged
    with pytest.raises(RepositoryError, match="is a symlink, not a folder"):
        repo.load(INCREMENTAL)


def test_image_and_manifest_symlinks_are_refused(repo: VMRepository, outside: Path) -> None:
    image = repo.path / INCREMENTAL / "vda.qcow2"
    image.unlink()
    image.symlink_to(outside / VM / INCREMENTAL / "vda.qcow2")
    with pytest.raises(ChainError, match=r"vda.qcow2 of backup .* is a symlink"):
        chain_files(repo, repo.load(INCREMENTAL), "vda")
    manifest = repo.path / FULL / "manifest.json"
    manifest.unlink()
    manifest.symlink_to(outside / VM / FULL / "manifest.json")
    with pytest.raises(RepositoryError, match=r"manifest.json of backup .* is a symlink"):
        repo.load(FULL)


def test_vm_folder_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    repository = Repository(tmp_path / "other").vm(VM)
    repository.root.mkdir()
    repository.path.symlink_to(outside / VM)
    with pytest.raises(RepositoryError, match=r"folder of vm guest1 .* is a symlink"):
        repository.ids()
    with pytest.raises(RepositoryError, match="is a symlink"):
        repository.ensure()
    assert (outside / VM).stat().st_mode & 0o777 != 0 and not (outside / VM / ".lock").exists()


def test_fifo_manifest_and_device_image_do_not_hang(repo: VMRepository) -> None:
    manifest = repo.path / FULL / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.raises(RepositoryError, match="is a special file"):
        repo.load(FULL)
    image = repo.path / INCREMENTAL / "vda.qcow2"
    image.unlink()
    os.mkfifo(image)
    with pytest.raises(ChainError, match="is a special file"):
        chain_files(repo, repo.load(INCREMENTAL), "vda")


def test_lock_file_symlink_is_refused_and_target_untouched(
    repo: VMRepository, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    canary.write_text("precious\n")
    repo.lock_path.symlink_to(canary)
    with pytest.raises(RepositoryError, match="is a symlink"), repo.lock(purpose="prune"):
        pass
    assert canary.read_text() == "precious\n"


def test_missing_file_and_missing_parent(repo: VMRepository) -> None:
    (repo.path / FULL / "vda.qcow2").unlink()
    with pytest.raises(ChainError, match=r"file vda.qcow2 is missing"):
        chain_files(repo, repo.load(INCREMENTAL), "vda")
    shutil.rmtree(repo.path / FULL)
    with pytest.raises(ChainError, match="needs missing parent"):
        repo.chain(INCREMENTAL)
    with pytest.raises(NotFoundError):
        repo.load(FULL)
    with pytest.raises(UsageError, match="invalid backup id"):
        repo.load("../x")


def test_damaged_parent_is_named(repo: VMRepository) -> None:
    (repo.path / FULL / "manifest.json").write_text("{")
    with pytest.raises(ChainError, match=f"needs damaged parent {FULL}: corrupt manifest"):
        repo.chain(INCREMENTAL)


def test_latest_good_skips_damaged_newest(repo: VMRepository) -> None:
    (repo.path / INCREMENTAL / "manifest.json").write_text('{"format": 1}')
    latest, skipped = repo.latest_good()
    assert latest is not None and latest.id == FULL
    assert [b for b, _ in skipped] == [INCREMENTAL]
    assert "corrupt manifest" in skipped[0][1]
    (repo.path / FULL / "manifest.json").unlink()
    latest, skipped = repo.latest_good()
    assert latest is None and [b for b, _ in skipped] == [INCREMENTAL, FULL]


@pytest.mark.timeout(20)
def test_new_id_with_the_clock_a_year_behind(repo: VMRepository) -> None:
    """The next id is computed at once (not searched second by second)."""
    (repo.path / ".tmp-20270101T000000Z").mkdir()
    behind = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert repo.new_id(behind) == "20270101T000001Z"
    assert repo.new_id(dt.datetime(2028, 5, 6, 7, 8, 9, tzinfo=dt.UTC)) == "20280506T070809Z"


def test_parent_cycle_ends_with_a_chain_error(repo: VMRepository) -> None:
    """A manifest cannot name a parent that is not older; and a chain of parents that
    loops (as retention sees it) ends with ChainError instead of looping forever."""
    data = json.loads((repo.path / FULL / "manifest.json").read_text())
    data.update(kind="incremental", parent=INCREMENTAL)
    (repo.path / FULL / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ChainError, match=r"needs damaged parent .* not the id of an older"):
        repo.chain(INCREMENTAL)
    with pytest.raises(ChainError, match="do not lead to a full backup"):
        plan_merges({"a": "b", "b": "a"}, {"b"})
    plan = plan_merges({"c": "b", "b": "a", "a": None}, {"c"})
    assert [(f.target, f.folded) for f in plan.folds] == [("c", ("a", "b"))]


@pytest.mark.parametrize("name", ["guest1\n", "vda\n", "a..b", "../x", "-x", "x" * 129])
def test_names_are_whole_string_matches(tmp_path: Path, name: str) -> None:
    """A trailing newline is not a name (``$`` matched before it)."""
    data = {"repository": "/r", "vms": {name: {"qmp": "/q"}}}
    with pytest.raises(ConfigError, match="invalid VM name"):
        parse_config(data, tmp_path / "c.yaml")
    data = {"repository": "/r", "vms": {"ok": {"qmp": "/q", "disks": [name]}}}
    with pytest.raises(ConfigError, match="invalid disk name"):
        parse_config(data, tmp_path / "c.yaml")
    assert parse_config({"repository": "/r", "vms": {"g-1.x_2": {"qmp": "/q"}}}, tmp_path)


def test_the_repository_side_does_not_import_the_configuration() -> None:
    """Names have their own module: the repository, the manifests and the gate raise
    repository errors, not configuration errors, and never import the config parser."""
    code = (
        "import sys, backupd.repository, backupd.chain, backupd.manifest\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('backupd'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "backupd.repository" in loaded and "backupd.config" not in loaded


def test_first_runs_at_once_agree_on_one_repository_id(tmp_path: Path) -> None:
    """Two first runs (of two VMs) at the same instant: one id, never a half-written one."""
    import concurrent.futures
    import threading

    from backupd.repository import Repository

    for attempt in range(20):
        root = tmp_path / f"repo{attempt}"
        barrier = threading.Barrier(8)

        def first_use(root: Path = root, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return Repository(root).identity()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = set(pool.map(lambda _: first_use(), range(8)))
        assert len(ids) == 1, ids
        assert sorted(p.name for p in root.iterdir()) == [".repository-id"]

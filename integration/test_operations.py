"""What an operator sees after real runs: status --json, the Prometheus textfile, the
summary line in JSON logs."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from integration.conftest import MiB, backupd, serving
from integration.harness.chain import backups, checkpoint_bitmap, read_image
from integration.harness.runs import argv, run_env, until_backupd_runs, wait_for_staging
from integration.harness.servers import nbdkit
from integration.harness.vm import QemuVM


async def test_status_metrics_and_json_logs(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    data = yaml.safe_load(config.read_text())
    metrics = tmp_path / "textfile" / "backupd.prom"
    data["metrics_file"] = str(metrics)
    config.write_text(yaml.safe_dump(data))
    await vm.write("vda", 0, 2 * MiB, 0x01)
    first = backupd(config, "--log-json", "run", "--vm", "guest1")
    assert first.returncode == 0, first.stderr
    summary = next(json.loads(line) for line in first.stderr.splitlines() if '"summary' in line)
    assert summary["vm"] == "guest1" and summary["kind"] == "full"
    assert summary["result"] == "ok" and summary["bytes"] == 2 * MiB
    await vm.write("vda", 4 * MiB, MiB, 0x02)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    status = json.loads(backupd(config, "status", "--json").stdout)[0]
    assert status["vm"] == "guest1" and status["last_result"] == "ok"
    assert status["chain_length"] == 1 and status["backups"] == 2
    assert 0 <= status["age_seconds"] < 120
    assert status["repository_bytes"] >= 3 * MiB
    text = metrics.read_text()
    assert 'backupd_last_run_success{vm="guest1"} 1' in text
    assert f'backupd_last_run_bytes{{vm="guest1",disk="vda"}} {MiB}' in text
    assert 'backupd_chain_length{vm="guest1"} 1' in text
    assert "backupd_last_success_timestamp_seconds" in text
    # a failed run: the last success stays, the last result says failed
    data["vms"]["guest1"]["qmp"] = str(tmp_path / "gone.sock")
    config.write_text(yaml.safe_dump(data))
    assert backupd(config, "run", "--vm", "guest1").returncode == 1
    status = json.loads(backupd(config, "status", "--json").stdout)[0]
    assert status["last_result"] == "failed" and "does not exist" in status["last_error"]
    assert status["last_success"] is not None
    assert 'backupd_last_run_success{vm="guest1"} 0' in metrics.read_text()
    human = backupd(config, "status")
    assert "last run failed" in human.stdout


async def test_two_repositories_keep_their_own_chains(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    """A local and a second repository for one VM: each run continues its own chain,
    and neither removes the other's bitmap."""
    first = config_for(vm)
    data = yaml.safe_load(first.read_text())
    data["repository"] = str(tmp_path / "offsite")
    second = tmp_path / "offsite.yaml"
    second.write_text(yaml.safe_dump(data))
    models = []
    for round_ in range(3):
        await vm.write("vda", round_ * 2 * MiB, MiB, 0x40 + round_)
        models.append(vm.snapshot()["vda"])
        for config in (first, second):
            result = backupd(config, "run", "--vm", "guest1")
            assert result.returncode == 0, result.stderr
            assert ("kind=full" if round_ == 0 else "kind=incremental") in result.stderr
    for repo in (tmp_path / "repo", tmp_path / "offsite"):
        found = backups(repo)
        assert len(found) == 3
        for folder, model in zip(found, models, strict=True):
            assert read_image(folder / "vda.qcow2", tmp_path) == model
    names = sorted(b["name"] for b in await vm.bitmaps("vda"))
    expected = sorted(
        checkpoint_bitmap(backups(r)[-1]) for r in (tmp_path / "repo", tmp_path / "offsite")
    )
    assert names == expected


async def test_overlapping_runs_of_one_vm_from_two_configurations_are_refused(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    first = config_for(vm)
    data = yaml.safe_load(first.read_text())
    data["repository"] = str(tmp_path / "offsite")
    second = tmp_path / "offsite.yaml"
    second.write_text(yaml.safe_dump(data))
    await vm.write("vda", 0, 4 * MiB, 0x51)
    holder = run_env(first, "mid-copy:hang")
    try:
        await wait_for_staging(tmp_path / "repo", holder)
        refused = backupd(second, "run", "--vm", "guest1")
    finally:
        holder.kill()
        holder.communicate()
    assert refused.returncode == 3, refused.stderr
    assert "busy" in refused.stderr and f"(pid {holder.pid})" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert backupd(second, "run", "--vm", "guest1").returncode == 0


async def test_exit_codes_and_one_line_errors(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm, keep_last=1)
    await vm.write("vda", 0, MiB, 0x61)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    bad_id = backupd(config, "restore", "--vm", "guest1", "--backup", "yesterday",
                     "--disk", "vda", "--output", str(tmp_path / "x.raw"))  # fmt: skip
    assert bad_id.returncode == 2 and "invalid backup id" in bad_id.stderr
    with serving(config):
        pruned = backupd(config, "prune", "--vm", "guest1")
    assert pruned.returncode == 3 and "backupd serve --vm guest1 (pid" in pruned.stderr
    assert len(pruned.stderr.strip().splitlines()) == 1, pruned.stderr


async def test_list_columns_line_up(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    await vm.write("vda", 0, MiB, 0x71)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 8 * MiB, 64 * 1024, 0x72)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    lines = backupd(config, "list").stdout.splitlines()
    assert len(lines) == 3
    for column in ("KIND", "PARENT", "CREATED", "DISKS", "STATUS"):
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines)
    stored_end = lines[0].index("STORED") + len("STORED")
    assert all(line[stored_end - 1] != " " and line[stored_end] == " " for line in lines)
    status = backupd(config, "status").stdout
    assert " s ago, crash-consistent)" in status, status


async def test_status_as_a_monitoring_user_says_where_to_look(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    public = Path(tempfile.mkdtemp(prefix="backupd-public-"))
    try:
        public.chmod(0o755)
        readable = (
            public / "backupd.yaml"
        )  # a config the user may read; the repository stays root's
        readable.write_text(config.read_text())
        readable.chmod(0o644)
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             *argv(readable, "status", "--json")],
            capture_output=True,
            text=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(public)
    assert result.returncode == 1, result.stderr
    assert "permission denied" in result.stderr and "metrics_file" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_a_scratch_folder_that_is_not_ours_alone_is_refused(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "scratch").mkdir(mode=0o700)
    (tmp_path / "scratch" / "guest1").symlink_to(elsewhere)  # planted by someone else
    result = backupd(config_for(vm), "run", "--vm", "guest1")
    assert result.returncode == 2, result.stderr
    assert "scratch_dir" in result.stderr and "symlink" in result.stderr
    assert not list(elsewhere.iterdir()) and not backups(tmp_path / "repo")
    (tmp_path / "scratch" / "guest1").unlink()
    result = backupd(config_for(vm), "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scratch" / "guest1").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_an_interrupted_restore_exits_128_plus_signal_quietly(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path, sig: int
) -> None:
    config = config_for(vm)
    await vm.write("vda", 0, 4 * MiB, 0x61)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    # a target that takes 30 s per write: the restore is surely under way when stopped
    with nbdkit(sockdir / "slow.sock", "memory", "64M", "delay-write=30", filters=["delay"]) as uri:
        proc = subprocess.Popen(
            argv(config, "restore", "--vm", "guest1", "--disk", "vda", "--to", uri),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        await until_backupd_runs(proc.pid)
        await asyncio.sleep(1.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert "restore interrupted" in err and "Traceback" not in err, err

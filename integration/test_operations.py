"""What an operator sees after real runs: status --json, the Prometheus textfile, the
summary line in JSON logs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from integration.conftest import MiB, backupd
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

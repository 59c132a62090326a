"""The last run of every VM (``<vm>/.status.json``), ``backupd status`` data, and the
Prometheus textfile (node_exporter textfile collector format), written atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.config import Config
from backupd.errors import RepositoryError
from backupd.names import is_name
from backupd.repository import Repository, VMRepository

STATUS_FILE = ".status.json"

log = logging.getLogger("backupd")


def _atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class RunRecord:
    vm: str
    result: str  # ok | failed
    started: float
    duration: float
    backup: str | None
    kind: str | None
    reason: str
    bytes: int
    disks: dict[str, int]
    error: str = ""


def record_run(repo: VMRepository, record: RunRecord) -> None:
    """Store the outcome of a run (the last success is kept across failures)."""
    repo.ensure()
    path = repo.path / STATUS_FILE
    data = read_status(repo)
    entry = {
        "result": record.result,
        "started": record.started,
        "duration": record.duration,
        "backup": record.backup,
        "kind": record.kind,
        "reason": record.reason,
        "bytes": record.bytes,
        "disks": record.disks,
        "error": record.error,
    }
    data["last_run"] = entry
    if record.result == "ok":
        data["last_success"] = entry
    _atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_status(repo: VMRepository) -> dict[str, Any]:
    """The recorded runs; an entry of the wrong shape (the repository is not trusted)
    is left out, as if it had never been written."""
    try:
        raw = repo.read_own_file(STATUS_FILE)
        data = json.loads(raw) if raw is not None else {}
    except (OSError, RepositoryError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: data[key] for key in ("last_run", "last_success") if _sound(data.get(key))}


def _sound(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    numbers = ("started", "duration", "bytes")
    values = [entry.get(k, 0) for k in numbers]
    if not all(type(v) in (int, float) and 0 <= v < math.inf for v in values):
        return False
    texts = ("result", "backup", "kind", "reason", "error")
    if not all(entry.get(k) is None or isinstance(entry[k], str) for k in texts):
        return False
    disks = entry.get("disks", {})
    return isinstance(disks, dict) and all(
        is_name(name) and type(count) is int for name, count in disks.items()
    )


def vm_status(config: Config, vm: str, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows for one VM."""
    now = time.time() if now is None else now
    repo = Repository(config.repository).vm(vm)
    status = read_status(repo)
    try:
        ids = repo.ids()
    except RepositoryError as exc:  # the VM's folder is a symlink: verify and list say so
        log.warning("%s", exc)
        ids = []
    chain_length = 0
    stored = 0
    for backup in ids:
        try:
            manifest = repo.load(backup)
        except Exception:  # a damaged manifest shows in verify, not here
            continue
        stored += manifest.bytes_stored
        chain_length = 0 if manifest.kind == "full" else chain_length + 1
    success = status.get("last_success") or {}
    last = status.get("last_run") or {}
    finished = success.get("started", 0) + success.get("duration", 0) if success else None
    return {
        "vm": vm,
        "last_success": success.get("backup"),
        "last_success_time": finished,
        "age_seconds": round(now - finished, 1) if finished else None,
        "last_result": last.get("result"),
        "last_error": last.get("error") or None,
        "last_duration": last.get("duration"),
        "backups": len(ids),
        "latest": ids[-1] if ids else None,
        "chain_length": chain_length,
        "repository_bytes": stored,
    }


def write_metrics(config: Config) -> None:
    """The Prometheus textfile with the last run of every VM, if configured."""
    if config.metrics_file is None:
        return
    lines = [
        "# HELP backupd_last_success_timestamp_seconds End of the last successful backup.",
        "# TYPE backupd_last_success_timestamp_seconds gauge",
        "# HELP backupd_last_run_success 1 if the last run succeeded, 0 if it failed.",
        "# TYPE backupd_last_run_success gauge",
        "# HELP backupd_last_run_duration_seconds Duration of the last run.",
        "# TYPE backupd_last_run_duration_seconds gauge",
        "# HELP backupd_last_run_bytes Bytes copied by the last run, per disk.",
        "# TYPE backupd_last_run_bytes gauge",
        "# HELP backupd_repository_bytes Bytes stored in the repository per VM.",
        "# TYPE backupd_repository_bytes gauge",
        "# HELP backupd_chain_length Incrementals since the last full backup.",
        "# TYPE backupd_chain_length gauge",
    ]
    for vm in sorted(config.vms):
        repo = Repository(config.repository).vm(vm)
        status = read_status(repo)
        info = vm_status(config, vm)
        label = f'vm="{vm}"'
        if info["last_success_time"]:
            lines.append(
                f"backupd_last_success_timestamp_seconds{{{label}}} {info['last_success_time']:.3f}"
            )
        last = status.get("last_run")
        if last:
            lines.append(
                f"backupd_last_run_success{{{label}}} {1 if last.get('result') == 'ok' else 0}"
            )
            lines.append(
                f"backupd_last_run_duration_seconds{{{label}}} {last.get('duration', 0):.3f}"
            )
            for disk, count in sorted((last.get("disks") or {}).items()):
                lines.append(f'backupd_last_run_bytes{{{label},disk="{disk}"}} {count}')
        lines.append(f"backupd_repository_bytes{{{label}}} {info['repository_bytes']}")
        lines.append(f"backupd_chain_length{{{label}}} {info['chain_length']}")
    config.metrics_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(config.metrics_file, "\n".join(lines) + "\n", 0o644)

"""The last run of every VM (``<vm>/.status.json``), ``backupd status`` data, and the
Prometheus textfile (node_exporter textfile collector format), written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.config import Config
from backupd.errors import RepositoryError
from backupd.logs import Outcome
from backupd.names import is_name
from backupd.storage.repositories import repository_for
from backupd.storage.vmrepo import VMRepo

STATUS_FILE = ".status.json"

log = logging.getLogger("backupd")


def _atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``path`` whole or not at all, with exactly ``mode`` (whatever the umask).
    The temporary file has an unpredictable name and is created exclusively, so a
    planted symlink in a shared folder is never followed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class RunRecord:
    vm: str
    result: Outcome  # ok or failed (an interrupted run did not succeed)
    started: float
    duration: float
    backup: str | None
    kind: str | None
    reason: str
    bytes: int
    disks: dict[str, int]
    error: str = ""
    #: "quiesced" or "crash-consistent" for a committed backup
    consistency: str | None = None
    #: "online" or "offline" (the VM's qemu was not running), when the run got that far
    source: str | None = None


def record_run(repo: VMRepo, record: RunRecord) -> None:
    """Store the outcome of a run (the last success is kept across failures)."""
    repo.ensure()
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
        "consistency": record.consistency,
        "source": record.source,
    }
    data["last_run"] = entry
    if record.result is Outcome.OK:
        data["last_success"] = entry
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    repo.write_own_file(STATUS_FILE, text.encode())


def read_status(repo: VMRepo) -> dict[str, Any]:
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
    texts = ("result", "backup", "kind", "reason", "error", "consistency", "source")
    if not all(entry.get(k) is None or isinstance(entry[k], str) for k in texts):
        return False
    disks = entry.get("disks", {})
    return isinstance(disks, dict) and all(
        is_name(name) and type(count) is int for name, count in disks.items()
    )


def _unreadable(repo: VMRepo, exc: OSError) -> RepositoryError:
    return RepositoryError(
        f"cannot read {exc.filename or repo.where}: permission denied (the repository is "
        "root's alone; monitoring users read the metrics_file, which is world-readable)"
    )


def vm_status(config: Config, vm: str, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows for one VM."""
    now = time.time() if now is None else now
    repo = repository_for(config).vm(vm)
    try:
        repo.check_readable()
    except PermissionError as exc:
        raise _unreadable(repo, exc) from None
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
        "last_success_consistency": success.get("consistency"),
        "last_success_source": success.get("source") or ("online" if success else None),
        "age_seconds": round(now - finished, 1) if finished else None,
        "last_result": last.get("result"),
        "last_source": last.get("source"),
        "last_error": last.get("error") or None,
        "last_duration": last.get("duration"),
        "backups": len(ids),
        "latest": ids[-1] if ids else None,
        "chain_length": chain_length,
        "repository_bytes": stored,
    }


#: (name, help) of every metric, each written for every VM from the first run on
METRICS = (
    ("backupd_last_success_timestamp_seconds", "End of the last successful backup (0: never)."),
    ("backupd_last_success_quiesced", "1 if the last good backup had frozen file systems."),
    ("backupd_last_run_timestamp_seconds", "End of the last run (0: never ran)."),
    ("backupd_last_run_success", "1 if the last run succeeded, 0 if it failed or never ran."),
    ("backupd_last_run_duration_seconds", "Duration of the last run."),
    ("backupd_last_run_bytes", "Bytes copied by the last run, per disk."),
    ("backupd_backups", "Backups in the repository."),
    ("backupd_repository_bytes", "Bytes stored in the repository."),
    ("backupd_chain_length", "Incrementals since the last full backup."),
)


def _samples(config: Config, vm: str) -> dict[str, list[tuple[str, float]]]:
    """Per metric: (extra labels, value) of one VM."""
    last = read_status(repository_for(config).vm(vm)).get("last_run") or {}
    info = vm_status(config, vm)
    ended = last.get("started", 0) + last.get("duration", 0) if last else 0
    disks = sorted((last.get("disks") or {}).items())
    return {
        "backupd_last_success_timestamp_seconds": [("", info["last_success_time"] or 0)],
        "backupd_last_success_quiesced": [
            ("", 1 if info["last_success_consistency"] == "quiesced" else 0)
        ],
        "backupd_last_run_timestamp_seconds": [("", ended)],
        "backupd_last_run_success": [("", 1 if last.get("result") == "ok" else 0)],
        "backupd_last_run_duration_seconds": [("", last.get("duration", 0))],
        "backupd_last_run_bytes": [(f',disk="{disk}"', count) for disk, count in disks],
        "backupd_backups": [("", info["backups"])],
        "backupd_repository_bytes": [("", info["repository_bytes"])],
        "backupd_chain_length": [("", info["chain_length"])],
    }


def write_metrics(config: Config) -> None:
    """The Prometheus textfile with every VM, if configured: world-readable (0644, for
    node_exporter), written atomically, each metric family in one block."""
    if config.metrics_file is None:
        return
    per_vm = {vm: _samples(config, vm) for vm in sorted(config.vms)}
    lines: list[str] = []
    for name, text in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        for vm, samples in per_vm.items():
            for labels, value in samples[name]:
                number = f"{value:.3f}" if isinstance(value, float) else str(value)
                lines.append(f'{name}{{vm="{vm}"{labels}}} {number}')
    config.metrics_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(config.metrics_file, "\n".join(lines) + "\n", 0o644)

"""Log formats, progress modes, and the shipped systemd units."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backupd import logs
from backupd.config import ImageConfig, parse_config
from backupd.progress import Progress

ROOT = Path(__file__).resolve().parents[2]


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-{id(stream)}")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def test_summary_line_in_text_json_and_journal() -> None:
    for formatter, check in (
        (logs.TextFormatter(), lambda s: "summary: vm=g1 backup=B kind=full" in s),
        (
            logs.TextFormatter(),
            lambda s: " consistency=quiesced source=offline duration=1.5s " in s,
        ),
        (logs.JournalFormatter(), lambda s: s.startswith("<6>summary: vm=g1")),
        (logs.JSONFormatter(), lambda s: json.loads(s)["bytes"] == 3 << 20),
        (logs.JSONFormatter(), lambda s: json.loads(s)["consistency"] == "quiesced"),
        (logs.JSONFormatter(), lambda s: json.loads(s)["source"] == "offline"),
    ):
        logger, stream = capture(formatter)
        logs.log_summary(
            logger,
            vm="g1",
            backup="B",
            kind="full",
            reason="first",
            disks=["vda"],
            copied=3 << 20,
            consistency="quiesced",
            duration=1.5,
            result=logs.Outcome.OK,
            source="offline",
        )
        assert check(stream.getvalue()), stream.getvalue()
    logger, stream = capture(logs.JournalFormatter())
    logger.error("broken")
    assert stream.getvalue() == "<3>broken\n"


def test_progress_lines_mode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backupd.progress")
    progress = Progress("g1/vda", 100 << 20, mode="lines", interval=0.0)
    progress.update(50 << 20)
    progress.close()
    assert "g1/vda: 50.0 MiB of 100.0 MiB (50%)" in caplog.text


def test_cli_help_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backupd", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "exit codes:" in out.stdout and "3  busy" in out.stdout
    for verb in ("run", "list", "status", "serve", "restore", "verify", "prune"):
        assert verb in out.stdout
        sub = subprocess.run(
            [sys.executable, "-m", "backupd", verb, "--help"], capture_output=True, text=True
        )
        assert sub.returncode == 0 and "examples:" in sub.stdout, verb
    version = subprocess.run(
        [sys.executable, "-m", "backupd", "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("backupd ")


def test_units_verify(tmp_path: Path) -> None:
    binary = shutil.which("backupd") or str(Path(sys.executable).parent / "backupd")
    for name, instance in (
        ("backupd@.service", "backupd@guest1.service"),
        ("backupd@.timer", "backupd@guest1.timer"),
        ("backupd-all.service", "backupd-all.service"),
        ("backupd-all.timer", "backupd-all.timer"),
    ):
        text = (ROOT / "configs" / name).read_text().replace("/opt/backupd/bin/backupd", binary)
        (tmp_path / instance).write_text(text)
    units = [
        str(tmp_path / n)
        for n in (
            "backupd@guest1.service",
            "backupd@guest1.timer",
            "backupd-all.service",
            "backupd-all.timer",
        )
    ]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True
    )
    problems = [line for line in result.stderr.splitlines() if "backupd" in line]
    assert result.returncode == 0 and not problems, result.stderr
    timer = (ROOT / "configs" / "backupd@.timer").read_text()
    assert "OnCalendar=*-*-* 01:30:00" in timer and "Persistent=true" in timer


def test_progress_bar_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    progress = Progress("g1/vda", 8 << 20, mode="bar")
    progress.update(4 << 20)
    progress.update(4 << 20)
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\rg1/vda:") and "/8.00M" in text and "B/s" in text


def test_quiet_means_no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    from backupd.progress import progress_mode

    assert progress_mode(True) == "none"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_mode(False) == "lines"


def _commented(config: str, key: str) -> str:
    """The example value of a key that the example configuration shows commented out."""
    line = next(li for li in config.splitlines() if li.lstrip("# ").startswith(f"{key}:"))
    return line.split(":", 1)[1].split("#")[0].strip()


def _example_images(config: str) -> tuple[ImageConfig, ...]:
    """The commented ``images:`` example of the example configuration, as backupd reads it."""
    entries = re.findall(r"#\s+(vd\w): (\S.*?)\s+#", config)
    images = {disk: yaml.safe_load(value) for disk, value in entries}
    assert images, "the example configuration shows no images"
    data = {"repository": "/r", "vms": {"guest1": {"qmp": "/q", "images": images}}}
    return parse_config(data, Path("/etc/backupd/backupd.yaml")).vm("guest1").images


def test_shipped_units_config_and_cron_agree() -> None:
    example = (ROOT / "configs" / "backupd.yaml").read_text()
    repository = Path(yaml.safe_load(example)["repository"])
    metrics = Path(_commented(example, "metrics_file"))
    scratch = Path(_commented(example, "scratch_dir"))
    runtime = Path(_commented(example, "runtime_dir"))
    images = [image.path for image in _example_images(example)]
    for unit in ("backupd@.service", "backupd-all.service"):
        text = (ROOT / "configs" / unit).read_text()
        line = next(li for li in text.splitlines() if li.startswith("ReadWritePaths="))
        writable = [Path(p.lstrip("-")) for p in line.split("=", 1)[1].split()]

        def inside(path: Path, folders: list[Path] = writable) -> bool:
            return any(path == f or f in path.parents for f in folders)

        assert inside(repository) and inside(scratch), unit
        assert inside(metrics.parent), f"{unit}: the metrics folder is not writable"
        assert all(inside(image) for image in images), f"{unit}: the images are not writable"
        if "PrivateTmp=yes" in text:  # qemu could not see scratch files there
            assert not inside(scratch, [Path("/tmp"), Path("/var/tmp")]), unit
        assert runtime == Path("/run") / next(
            li.split("=", 1)[1] for li in text.splitlines() if li.startswith("RuntimeDirectory=")
        )
    cron = (ROOT / "configs" / "backupd.cron").read_text()
    assert " run --all" in cron and " prune --all" in cron


def test_metrics_textfile_is_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    from backupd.config import parse_config
    from backupd.status import write_metrics

    config = parse_config(
        {
            "repository": str(tmp_path / "repo"),
            "metrics_file": str(tmp_path / "prom" / "backupd.prom"),
            "vms": {"g1": {"qmp": "/x.sock"}, "g2": {"qmp": "/y.sock"}},
        },
        tmp_path / "backupd.yaml",
    )
    old = os.umask(0o077)
    try:
        write_metrics(config)
    finally:
        os.umask(old)
    path = tmp_path / "prom" / "backupd.prom"
    assert path.stat().st_mode & 0o777 == 0o644
    text = path.read_text()
    # every metric for every VM from the first run on, each family in one block
    for vm in ("g1", "g2"):
        assert f'backupd_last_success_timestamp_seconds{{vm="{vm}"}} 0' in text
        assert f'backupd_last_run_success{{vm="{vm}"}} 0' in text
    families = [li.split("{")[0] for li in text.splitlines() if not li.startswith("#")]
    runs = [families[i] for i in range(len(families)) if i == 0 or families[i] != families[i - 1]]
    assert len(runs) == len(set(runs)), "a metric family is split into two blocks"
    assert not list((tmp_path / "prom").glob(".*")), "a temporary file was left"

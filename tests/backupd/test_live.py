"""Live restore's parts that need no VM: its arguments, its state file (a resume trusts
nothing in it unchecked), the overlay's header and qemu's image locks on it, and how
the served point's daemon is recognised (never a stranger that got its pid)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupd.cli import parse_args
from backupd.commands import CommandContext
from backupd.commands.restore import _rate
from backupd.errors import UsageError
from backupd.live.command import options
from backupd.live.flow import LiveOptions
from backupd.live.overlay import backing_file, blockdev_option, in_use, node_name
from backupd.live.served import ServedPoint
from backupd.live.state import LiveState, StateError, new_state, socket_path

URI = "nbd+unix:///vda?socket=/run/backupd/live-0123456789ab/nbd.sock"


@pytest.mark.parametrize(
    ("text", "rate"),
    [("0", 0), ("1048576", 1 << 20), ("1M", 1 << 20), ("50MiB/s", 50 << 20), ("2g", 2 << 30)],
)
def test_rates(text: str, rate: int) -> None:
    assert _rate(text) == rate


@pytest.mark.parametrize("text", ["", "-1", "1T", "M", "1.5M", "10 M"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _rate(text)


def live_options(*argv: str) -> LiveOptions:
    args = parse_args(["restore", "--live", *argv])
    return options(args, CommandContext(Path("/etc/backupd/backupd.yaml")))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--vm", "g", "--disk", "vda", "--output", "/x.qcow2"], "--target-qmp"),
        (["--vm", "g", "--disk", "vda", "--to", "nbd://h/x", "--target-qmp", "/q"], "--output"),
        (["--disk", "vda", "--output", "/x", "--target-qmp", "/q"], "--vm and --disk"),
        (["--vm", "g", "--disk", "vda", "--output", "/x", "--target-qmp", "/q", "--force"], "new"),
        (
            ["--vm", "g", "--disk", "v", "--output", "/x", "--target-qmp", "/q", "--format", "raw"],
            "--format",
        ),
        (["--resume", "--disk", "vda", "--output", "/x", "--target-qmp", "/q"], "--resume takes"),
        (
            ["--vm", "g", "--disk", "vda", "--output", "/x", "--target-qmp", "/q", "--wait", "-1"],
            "--wait",
        ),
    ],
)
def test_live_arguments_are_checked(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        live_options(*argv)


def test_live_arguments(tmp_path: Path) -> None:
    opts = live_options(
        *("--resume", "--output", str(tmp_path / "vda.qcow2"), "--target-qmp", "/run/q.sock"),
        *("--speed", "8M", "--wait", "5"),
    )
    assert isinstance(opts, LiveOptions)
    assert (opts.output, opts.target, opts.speed, opts.wait) == (
        tmp_path / "vda.qcow2",
        "/run/q.sock",
        8 << 20,
        5.0,
    )


def state(tmp_path: Path) -> LiveState:
    output = tmp_path / "vda.qcow2"
    socket = socket_path(Path("/run/backupd"), output)
    return new_state(
        output, Path("/var/lib/backupd"), "guest1", "20261124T013000Z", "vda", 1 << 30, socket
    )


def test_state_round_trip(tmp_path: Path) -> None:
    saved = state(tmp_path)
    assert LiveState.from_json(saved.to_json(), tmp_path) == saved
    assert saved.uri == f"nbd+unix:///vda?socket={saved.socket}"
    assert saved.socket.startswith("/run/backupd/live-") and saved.socket.endswith("/nbd.sock")
    # the same output always has the same socket and job (a resume after a reboot)
    assert state(tmp_path).socket == saved.socket and state(tmp_path).job == saved.job


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vm", "../etc"),
        ("disk", "vda/../../x"),
        ("backup", "latest"),
        ("size", -1),
        ("size", "1024"),
        ("socket", "/run/x.sock&tls=1"),
        ("socket", "relative.sock"),
        ("format", 2),
        ("job", None),
    ],
)
def test_damaged_state_is_refused(tmp_path: Path, field: str, value: object) -> None:
    data = json.loads(state(tmp_path).to_json())
    data[field] = value
    with pytest.raises(StateError, match="damaged"):
        LiveState.from_json(json.dumps(data), tmp_path)
    del data[field]
    with pytest.raises(StateError, match="damaged"):
        LiveState.from_json(json.dumps(data), tmp_path)


@pytest.mark.parametrize("runtime", ["/run/back updy", "/run/a&b", "/" + "x" * 90])
def test_runtime_folders_that_do_not_fit_a_uri(runtime: str) -> None:
    with pytest.raises(UsageError, match="runtime_dir"):
        socket_path(Path(runtime), Path("/var/lib/vms/vda.qcow2"))


def test_overlay_header_and_qemu_options(tmp_path: Path) -> None:
    overlay = tmp_path / "a,b.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            URI,
            str(overlay),
            "1G",
        ],
        check=True,
    )
    assert backing_file(overlay) == URI
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1G"], check=True)
    assert backing_file(plain) is None
    assert blockdev_option("drive-vda", overlay).endswith(f"file.filename={tmp_path}/a,,b.qcow2")
    assert node_name("vda") == "drive-vda" and len(node_name("d" * 40)) <= 31


def test_in_use_sees_qemus_image_locks(tmp_path: Path) -> None:
    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    assert not in_use(image)
    # qemu-io holds the image open (and locked, as qemu does) while it waits on stdin
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not in_use(image):
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.02)
    finally:
        holder.communicate(b"quit\n", timeout=10)
    assert not in_use(image)


async def test_the_daemon_is_known_by_its_locked_pid_file_only(tmp_path: Path) -> None:
    served = ServedPoint(tmp_path, tmp_path / "nbd.sock")
    assert served.pid() is None  # no pid file
    served.pidfile.write_text(f"{os.getpid()}\n")
    assert served.pid() is None  # a pid file nobody holds: its daemon is gone
    # a stranger that holds the lock (a reused pid, another program) is not the daemon
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); "
        "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)"
    )
    stranger = subprocess.Popen(
        [sys.executable, "-c", code, str(served.pidfile)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert stranger.stdout is not None and stranger.stdout.readline() == "locked\n"
        assert served.pid() is None
    finally:
        stranger.kill()
        stranger.wait()
    served.pidfile.unlink()
    # the real one: qemu-storage-daemon holds the lock on its pid file while it lives
    daemon = subprocess.Popen(["qemu-storage-daemon", "--pidfile", str(served.pidfile)])
    try:
        deadline = time.monotonic() + 10
        while served.pid() is None:
            assert daemon.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert served.pid() == daemon.pid
        await served.stop()
        assert daemon.wait(5) == 0 and served.pid() is None
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

"""Quiescing with a guest agent, on real qemu: a freeze is always undone, whatever ends
the run; a guest left frozen is thawed first; what a run gave (quiesced or
crash-consistent) is visible everywhere.  The agent here is the qemu-ga stand-in of
integration/harness/agent.py, which can be made slow or hung on cue; the same promises
are checked against a real Linux guest's qemu-ga in test_guest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from integration.conftest import MiB, backupd
from integration.faults_table import record
from integration.harness.agent import FakeGuestAgent
from integration.harness.chain import backups
from integration.harness.runs import argv, backupd_async, leftovers, lost_after, until_backupd_runs
from integration.harness.vm import QemuVM

NOISE = ("Traceback", "Task was destroyed", "Exception ignored", "never retrieved")


@pytest.fixture
async def agent(sockdir: Path) -> AsyncIterator[FakeGuestAgent]:
    async with FakeGuestAgent(sockdir / "qga.sock").serving() as serving:
        yield serving


def summary(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "summary:" in line)


async def test_quiesced_run_is_visible_everywhere(
    vm: QemuVM, config_for: Callable[..., Path], agent: FakeGuestAgent, tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics" / "backupd.prom"
    config = config_for(vm, guest_agent=str(agent.path))
    text = config.read_text() + f"metrics_file: {metrics}\n"
    config.write_text(text)
    await vm.write("vda", 0, MiB, 0x11)
    result = await backupd_async(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert agent.calls == [
        "guest-sync-delimited",
        "guest-fsfreeze-status",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]
    assert not agent.frozen
    assert "consistency=quiesced" in summary(result.stderr)
    status = json.loads(backupd(config, "status", "--json").stdout)[0]
    assert status["last_success_consistency"] == "quiesced"
    assert "quiesced" in backupd(config, "status").stdout
    assert 'backupd_last_success_quiesced{vm="guest1"} 1' in metrics.read_text()
    assert metrics.stat().st_mode & 0o777 == 0o644
    listed = json.loads(backupd(config, "list", "--json").stdout)
    assert [row["quiesced"] for row in listed] == [True]


async def test_without_an_agent_the_run_says_crash_consistent(
    vm: QemuVM, config_for: Callable[..., Path], sockdir: Path
) -> None:
    config = config_for(vm, guest_agent=str(sockdir / "nope.sock"))
    result = await backupd_async(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert "guest agent socket" in result.stderr and "does not exist" in result.stderr
    assert "consistency=crash-consistent" in summary(result.stderr)
    status = json.loads(backupd(config, "status", "--json").stdout)[0]
    assert status["last_success_consistency"] == "crash-consistent"


async def test_a_qmp_socket_given_as_agent_is_recognised_at_once(
    vm: QemuVM, config_for: Callable[..., Path], sockdir: Path
) -> None:
    monitor = sockdir / "other.qmp"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{monitor},server=on,wait=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if monitor.exists():
                break
            await asyncio.sleep(0.02)
        config = config_for(vm, guest_agent=str(monitor))
        started = time.monotonic()
        result = await backupd_async(config, "run", "--vm", "guest1")
        took = time.monotonic() - started
    finally:
        qemu.kill()
        qemu.wait()
    assert result.returncode == 0, result.stderr
    assert "is a QMP monitor, not the guest agent" in result.stderr
    assert took < 5, f"took {took:.1f} s: the agent's sync timed out instead"


async def test_a_guest_left_frozen_is_thawed_first(
    vm: QemuVM, config_for: Callable[..., Path], agent: FakeGuestAgent
) -> None:
    agent.frozen = True  # as a SIGKILLed run leaves it
    config = config_for(vm, guest_agent=str(agent.path))
    result = await backupd_async(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert "were FROZEN" in result.stderr and "thawing them now" in result.stderr
    assert not agent.frozen and "consistency=quiesced" in result.stderr


async def test_require_quiesce_fails_a_run_that_cannot_freeze(
    vm: QemuVM, config_for: Callable[..., Path], agent: FakeGuestAgent, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    no_agent = config_for(vm, require_quiesce=True)
    result = await backupd_async(no_agent, "run", "--vm", "guest1")
    assert result.returncode == 1 and "require_quiesce" in result.stderr, result.stderr
    agent.filesystems = 0  # an agent that freezes nothing
    nothing = config_for(vm, guest_agent=str(agent.path), require_quiesce=True)
    result = await backupd_async(nothing, "run", "--vm", "guest1")
    assert result.returncode == 1 and "could not be frozen" in result.stderr, result.stderr
    assert not backups(repo) and not agent.frozen
    assert not await leftovers(vm, repo, tmp_path / "scratch")


async def test_the_freeze_window_is_capped(
    vm: QemuVM, config_for: Callable[..., Path], agent: FakeGuestAgent, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    agent.freeze_seconds = 3.0
    config = config_for(vm, guest_agent=str(agent.path), freeze_timeout=1)
    await vm.write("vda", 0, MiB, 0x21)
    started = time.monotonic()
    result = await backupd_async(config, "run", "--vm", "guest1")
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "longer than freeze_timeout (1 s)" in result.stderr
    assert not agent.frozen and took < 10
    assert not backups(repo) and not await leftovers(vm, repo, tmp_path / "scratch")
    agent.freeze_seconds = 0.0
    assert lost_after(await backupd_async(config, "run", "--vm", "guest1"), repo, tmp_path, vm) == 0


@pytest.mark.slow
async def test_signals_at_random_instants_never_leave_the_guest_frozen(
    vm: QemuVM, config_for: Callable[..., Path], agent: FakeGuestAgent, tmp_path: Path
) -> None:
    """SIGINT/SIGTERM anywhere in a run (the agent takes 0.2 s to freeze, so many land
    inside the freeze): the guest is always thawed when backupd has exited, the exit code
    is 0 or 128+signal, nothing noisy is printed, and the next run has every change."""
    repo = tmp_path / "repo"
    agent.freeze_seconds = 0.2
    config = config_for(vm, guest_agent=str(agent.path))
    await vm.write("vda", 0, 4 * MiB, 0x31)
    started = time.monotonic()
    assert (await backupd_async(config, "run", "--vm", "guest1")).returncode == 0
    span = time.monotonic() - started
    rng = random.Random(21)
    outcomes: dict[int, int] = {}
    for trial in range(24):
        sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
        await vm.write("vda", rng.randrange(64) * 65536, 65536, trial + 1)
        proc = await asyncio.create_subprocess_exec(
            *argv(config, "--log-level", "debug", "run", "--vm", "guest1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        await until_backupd_runs(proc.pid)
        await asyncio.sleep(rng.uniform(0.0, span * 1.1))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        _, raw = await asyncio.wait_for(proc.communicate(), 60)
        err = raw.decode(errors="replace")
        code = proc.returncode
        outcomes[code] = outcomes.get(code, 0) + 1
        noisy = [word for word in NOISE if word in err]
        bad = agent.frozen or code not in (0, 128 + sig) or noisy
        record(
            "SIGINT/SIGTERM at a random instant: guest thawed, 0 or 128+sig, quiet",
            failed=bool(bad),
        )
        assert not agent.frozen, f"trial {trial}: guest left frozen\n{err}"
        assert code in (0, 128 + sig), f"trial {trial}: exit {code}\n{err}"
        assert not noisy, f"trial {trial}: {noisy}\n{err}"
        left = await leftovers(vm, repo, tmp_path / "scratch")
        assert not left, f"trial {trial}: exit {code}, left {left}\n{err}"
    print(f"exit codes over 24 trials: {outcomes}")
    assert lost_after(await backupd_async(config, "run", "--vm", "guest1"), repo, tmp_path, vm) == 0

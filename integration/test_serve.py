"""``backupd serve`` against what a real network and a real daemon do: a port that is
already taken, a flood of peers that fail their TLS handshake, a daemon that dies, disk
names longer than qemu's node names, and nothing left behind when serving is refused."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import nbdclient
from integration.conftest import MiB, backupd, serving
from integration.harness.chain import backups
from integration.harness.runs import argv
from integration.harness.servers import free_port, make_psk_keys
from integration.harness.vm import QemuVM

pytestmark = pytest.mark.qemu


async def test_a_port_already_taken_is_an_error_not_another_server(
    vm: QemuVM, config_for: Callable[..., Path]
) -> None:
    config = config_for(vm)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        result = backupd(
            config, "serve", "--vm", "guest1", "--listen", f"127.0.0.1:{port}",
            "--insecure-plaintext", timeout=60,
        )  # fmt: skip
    finally:
        squatter.close()
    assert result.returncode == 1, result.stderr
    assert "cannot serve" in result.stderr and "Address already in use" in result.stderr
    assert result.stdout == "", "printed a URI that reaches another server"


@pytest.mark.slow
async def test_a_flood_of_failed_handshakes_does_not_stall_the_server(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    await vm.write("vda", 0, MiB, 0x5A)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    keys = make_psk_keys(tmp_path / "server", "alice")
    port = free_port()
    with serving(config, "--listen", f"127.0.0.1:{port}", "--tls-psk-file", str(keys)) as uri:

        async def bad_peer() -> None:  # NBD greeting, then garbage where STARTTLS goes
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readexactly(18)
            writer.write(b"\x00\x00\x00\x03" + b"IHAVEOPT" + b"\x00\x00\x00\x05" + bytes(4))
            writer.write(os.urandom(64))
            await writer.drain()
            await reader.read(4096)
            writer.close()

        for _ in range(30):
            await asyncio.gather(*(bad_peer() for _ in range(50)), return_exceptions=True)
        line = next(x for x in keys.read_text().splitlines() if x.startswith("alice:"))
        key = tmp_path / "alice.psk"
        key.write_text(line + "\n")
        async with await nbdclient.connect(
            f"{uri}?tls-psk-file={key}&tls-username=alice", timeout=20
        ) as client:
            assert await client.pread(MiB, 0) == vm.snapshot()["vda"][:MiB]


async def test_a_daemon_that_dies_ends_serve_with_an_error(
    vm: QemuVM, config_for: Callable[..., Path]
) -> None:
    config = config_for(vm)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    proc = subprocess.Popen(
        argv(config, "serve", "--vm", "guest1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        daemon = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "qemu-storage-d"], capture_output=True, text=True
        ).stdout.split()
        assert len(daemon) == 1
        os.kill(int(daemon[0]), signal.SIGKILL)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "serving backup" in err and "stopped" in err and "Traceback" not in err


async def test_long_disk_names_are_served(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    long_name = "data-disk-with-a-really-long-name-0001"  # over qemu's 31-character node names
    machine = QemuVM(tmp_path / "long", {long_name: 4 * MiB}, sockdir=sockdir / "l")
    machine.workdir.mkdir()
    (sockdir / "l").mkdir()
    await machine.start()
    try:
        config = config_for(machine)
        await machine.write(long_name, 0, MiB, 0x3C)
        assert backupd(config, "run", "--vm", "guest1").returncode == 0
        await machine.write(long_name, 2 * MiB, MiB, 0x3D)
        assert backupd(config, "run", "--vm", "guest1").returncode == 0
        with serving(config) as uri:
            assert uri.startswith(f"nbd+unix:///{long_name}?")
            async with await nbdclient.connect(uri) as client:
                assert await client.pread(client.size, 0) == machine.snapshot()[long_name]
    finally:
        await machine.kill()


async def test_nothing_is_left_behind_when_serving_is_refused(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    image = backups(tmp_path / "repo")[0] / "vda.qcow2"
    with open(image, "r+b") as file:  # an incompatible feature bit: the gate refuses it
        file.seek(72)
        file.write((1 << 40).to_bytes(8, "big"))
    before = set(glob.glob("/tmp/backupd-serve-*"))
    started = time.monotonic()
    result = backupd(config, "serve", "--vm", "guest1", timeout=60)
    assert result.returncode == 1 and "refusing to open it" in result.stderr, result.stderr
    assert time.monotonic() - started < 30
    assert set(glob.glob("/tmp/backupd-serve-*")) == before
    data = yaml.safe_load(config.read_text())
    assert data["vms"]["guest1"]["qmp"]  # the configuration is untouched

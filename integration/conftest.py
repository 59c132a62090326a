"""Fixtures for tests with real qemu: a short private socket folder, a VM with a byte
model of its disks, a real Linux guest (built once into ``.cache/guest``), a
configuration file, and a runner for the ``backupd`` CLI."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backupd.objectstore import ObjectStore, S3Settings
from integration.harness.guest import REPO, GuestBuild, LinuxGuest, build_guest
from integration.harness.runs import argv
from integration.harness.s3server import SwiftS3Server
from integration.harness.vm import QemuVM
from tests.conftest import sockdir

__all__ = ["sockdir"]  # the same private socket folder fixture as the unit tests


MiB = 1 << 20


@pytest.fixture
async def vm(tmp_path: Path, sockdir: Path) -> AsyncIterator[QemuVM]:
    machine = QemuVM(tmp_path / "vm", {"vda": 32 * MiB}, sockdir=sockdir)
    machine.workdir.mkdir()
    await machine.start()
    try:
        yield machine
    finally:
        await machine.kill()


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftS3Server]:
    """One real S3 server (Swift with s3api) for the whole test session, started when a
    test first asks for it; its logs stay in pytest's temporary folder.  Tests make
    their own bucket (``s3bucket``)."""
    server = SwiftS3Server(tmp_path_factory.mktemp("swift"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3bucket(s3server: SwiftS3Server) -> str:
    """A new, empty bucket of its own for one test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3server.create_bucket(name)
    return name


#: the key prefix of the S3 repositories of the tests
S3_PREFIX = "site-a/backups"


@pytest.fixture
def s3_config(
    tmp_path: Path, vm: QemuVM, s3server: SwiftS3Server, s3bucket: str
) -> Callable[..., Path]:
    """``s3_config(**top)``: a configuration whose repository is the test's bucket
    (``repository=``: another one, with the same ``s3:`` settings)."""

    def make(
        bucket: str = s3bucket, name: str = "backupd.yaml", repository: str = "", **top: Any
    ) -> Path:
        settings = {
            "endpoint_url": s3server.endpoint_url,
            "access_key_id": s3server.access_key_id,
            "secret_access_key": s3server.secret_access_key,
            "max_attempts": 2,
            **top.pop("s3", {}),
        }
        vm_settings = top.pop("vm_settings", {})
        return write_config(
            tmp_path / name,
            repository or f"s3://{bucket}/{S3_PREFIX}",  # type: ignore[arg-type]
            {"guest1": {"qmp": str(vm.qmp_path), **vm_settings}},
            s3=settings,
            scratch_dir=str(tmp_path / "scratch"),
            runtime_dir=str(vm.qmp_path.parent),
            **top,
        )

    return make


@pytest.fixture
async def bucket(s3server: SwiftS3Server, s3bucket: str) -> AsyncIterator[ObjectStore]:
    """The test's bucket, as the test itself reads and changes it."""
    settings = S3Settings(
        endpoint_url=s3server.endpoint_url,
        access_key_id=s3server.access_key_id,
        secret_access_key=s3server.secret_access_key,
    )
    async with ObjectStore(settings, s3bucket) as store:
        yield store


@pytest.fixture(scope="session")
def guest_build() -> GuestBuild:
    """The Linux guest's kernel and initrd, built once per machine (a later session
    finds them up to date in .cache/guest)."""
    return build_guest(REPO / ".cache" / "guest")


BootGuest = Callable[..., Awaitable[LinuxGuest]]


@pytest.fixture
async def boot_guest(
    tmp_path: Path, sockdir: Path, guest_build: GuestBuild
) -> AsyncIterator[BootGuest]:
    """``await boot_guest(image=None, workload=True)``: a Linux guest booted (on a new
    64 MiB ext4 disk, or on IMAGE) and ready; every guest is killed at the end."""
    guests: list[LinuxGuest] = []

    async def boot(image: Path | None = None, *, workload: bool = True) -> LinuxGuest:
        n = len(guests)
        guest = LinuxGuest(
            tmp_path / f"guest{n}",
            guest_build,
            sockdir=sockdir / str(n),
            image=image,
            workload=workload,
        )
        guests.append(guest)
        await guest.start()
        await guest.wait_ready()
        return guest

    try:
        yield boot
    finally:
        for guest in guests:
            await guest.kill()


@pytest.fixture
async def linux_guest(boot_guest: BootGuest) -> LinuxGuest:
    """A Linux guest on a new ext4 disk, its workload appending records."""
    return await boot_guest()


def write_config(
    path: Path, repository: Path, vms: dict[str, dict[str, object]], **top: object
) -> Path:
    data: dict[str, object] = {"repository": str(repository), **top, "vms": vms}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[..., Path]:
    def make(machine: QemuVM | LinuxGuest, name: str = "guest1", **vm_settings: object) -> Path:
        return write_config(
            tmp_path / "backupd.yaml",
            tmp_path / "repo",
            {name: {"qmp": str(machine.qmp_path), **vm_settings}},
            scratch_dir=str(tmp_path / "scratch"),
            runtime_dir=str(machine.qmp_path.parent),
        )

    return make


def backupd(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(config, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def restore_backup(
    config: Path, backup: str, output: Path, *extra: str, disk: str = "vda"
) -> subprocess.CompletedProcess[str]:
    """``backupd restore`` of one disk of guest1's backup ``backup`` into ``output``."""
    where = ("--vm", "guest1", "--backup", backup, "--disk", disk, "--output", str(output))
    return backupd(config, "restore", *where, *extra)


@contextlib.contextmanager
def serving(config: Path, *where: str, vm: str = "guest1") -> Iterator[str]:
    """``backupd serve --vm VM WHERE...`` in the background: yields the URI it prints,
    then stops it with SIGTERM and checks that it exited with 0."""
    proc = subprocess.Popen(
        argv(config, "serve", "--vm", vm, *where),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        code = proc.wait(10)
        assert proc.stderr is not None
        assert code == 0, proc.stderr.read()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here needs the real qemu tools; the fault suite's tests are its rows."""
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.qemu)
            if item.path.name == "test_faults.py":
                item.add_marker(pytest.mark.fault)


@pytest.fixture(autouse=True)
def _fault_rows(request: pytest.FixtureRequest) -> Iterator[None]:
    """Rows recorded by a test belong to it (see integration/faults_table.py)."""
    from integration import faults_table

    faults_table.current_test = request.node.nodeid
    yield
    faults_table.current_test = ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.nodeid:
        from integration import faults_table

        if any(row for row in faults_table.ROWS.values() if item.nodeid in row.tests) or (
            item.get_closest_marker("fault") is not None
        ):
            faults_table.mark_failed(item.nodeid, item.name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from integration.faults_table import table

    lines = table()
    if lines:
        terminalreporter.write_sep("=", "fault injection summary")
        for line in lines:
            terminalreporter.write_line(line)

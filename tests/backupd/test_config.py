"""The configuration file: defaults, overrides and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.config import load_config
from backupd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    config = load_config(ROOT / "configs" / "backupd.yaml")
    vm = config.vm("guest1")
    assert vm.qmp == "/run/qemu/guest1.qmp" and vm.max_chain == 14
    assert vm.transfer.request_size == 2 << 20 and vm.disks is None
    assert config.scratch_dir == Path("/var/lib/backupd/.scratch")


def test_defaults_and_overrides(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
repository: repo
compress: true
keep_daily: 7
vms:
  a: {qmp: /run/a.qmp, disks: [vda], max_chain: 3, request_size: 8M, keep_daily: 2}
  b: {qmp: "127.0.0.1:4444", guest_agent: /run/b.qga}
""",
        )
    )
    assert config.repository == tmp_path / "repo"
    a, b = config.vm("a"), config.vm("b")
    assert a.disks == ("vda",) and a.max_chain == 3 and a.transfer.request_size == 8 << 20
    assert a.transfer.compress and a.retention.keep_daily == 2
    assert b.retention.keep_daily == 7 and b.qmp_address == ("127.0.0.1", 4444)
    assert a.qmp_address == "/run/a.qmp"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vms: {}", "'repository' is required"),
        (
            "repository: /r\nvms: {a: {qmp: /x, dsiks: [vda]}}",
            "unknown configuration key 'vms.a.dsiks' (did you mean 'disks'?)",
        ),
        ("repository: /r\nrepositry: /x", "unknown configuration key 'repositry'"),
        ("repository: /r\nmax_chain: many", "max_chain must be an integer, not 'many'"),
        ("repository: /r\ncompress: 1", "compress must be true or false"),
        ("repository: /r\nvms: {a: {disks: [vda]}}", "vms.a.qmp is required"),
        ("repository: /r\nvms: {'../x': {qmp: /x}}", "invalid VM name '../x'"),
        ("repository: /r\nvms: {a: {qmp: /x, disks: [a/b]}}", "invalid disk name 'a/b'"),
        ("repository: /r\nrequest_size: 1G", "request_size must be between 64K and 32M"),
        ("repository: /r\nconnections: 0\nvms: {a: {qmp: /x}}", "connections must be at least 1"),
        ("- a\n- b", "must be a mapping"),
        ("repository: [oops", "malformed YAML at line 1"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_vm(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "repository: /r\nvms: {a: {qmp: /x}}"))
    with pytest.raises(ConfigError, match="unknown VM 'b' \\(configured: a\\)"):
        config.vm("b")

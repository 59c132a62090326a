"""The configuration file: defaults, overrides and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.config import Fleecing, load_config
from backupd.errors import ConfigError, QemuTooOldError
from backupd.qemu.fleece import choose_method
from backupd.qemu.inventory import Disk

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    config = load_config(ROOT / "configs" / "backupd.yaml")
    vm = config.vm("guest1")
    assert vm.qmp == "/run/qemu/guest1.qmp" and vm.max_chain == 14
    assert vm.transfer.request_size == 512 << 10 and vm.disks is None
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
    assert a.fleecing == "auto"


def _disk(name: str, device: str | None) -> Disk:
    return Disk(name, f"drive-{name}", "qcow2", "/x", 1 << 20, False, device)


def test_fleecing_method_follows_qemu_and_devices() -> None:
    vda, bare = _disk("vda", "/machine/peripheral/vda/virtio-backend"), _disk("n", None)
    assert choose_method(Fleecing.AUTO, (7, 2, 0), [vda]) == "snapshot-access"
    assert choose_method(Fleecing.AUTO, (7, 0, 0), [vda]) == "blockdev-backup"
    assert choose_method(Fleecing.AUTO, (8, 2, 1), [vda, bare]) == "blockdev-backup"
    assert choose_method(Fleecing.BLOCKDEV_BACKUP, (9, 0, 0), [vda]) == "blockdev-backup"
    with pytest.raises(QemuTooOldError, match=r"snapshot-access needs qemu >= 7\.1"):
        choose_method(Fleecing.SNAPSHOT_ACCESS, (6, 2, 0), [vda])
    with pytest.raises(ConfigError, match="n has none"):
        choose_method(Fleecing.SNAPSHOT_ACCESS, (7, 2, 0), [vda, bare])


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
        (
            "repository: /r\nvms: {a: {qmp: /x, fleecing: lvm}}",
            "vms.a.fleecing must be one of auto, snapshot-access, blockdev-backup, not 'lvm'",
        ),
        ("repository: /r\nvms: {a: {qmp: /x, images: [/i]}}", "vms.a.images must be a mapping"),
        ("repository: /r\nvms: {a: {qmp: /x, images: {}}}", "vms.a.images must name at least"),
        ("repository: /r\nvms: {a: {qmp: /x, images: {a/b: /i}}}", "invalid disk name 'a/b'"),
        (
            "repository: /r\nvms: {a: {qmp: /x, images: {vda: 5}}}",
            "vms.a.images.vda must be the path of the disk's image",
        ),
        ("repository: /r\nvms: {a: {qmp: /x, images: {vda: ''}}}", "vms.a.images.vda must be"),
        (
            "repository: /r\nvms: {a: {qmp: /x, images: {vda: {path: /i, fromat: raw}}}}",
            "unknown configuration key 'vms.a.images.vda.fromat' (did you mean 'format'?)",
        ),
        (
            "repository: /r\nvms: {a: {qmp: /x, images: {vda: {path: /i, format: vmdk}}}}",
            "vms.a.images.vda.format must be one of qcow2, raw, not 'vmdk'",
        ),
        (
            "repository: /r\nvms: {a: {qmp: /x, images: {vda: {format: raw}}}}",
            "vms.a.images.vda must be the path",
        ),
        (
            "repository: /r\nvms: {a: {qmp: /x, images: {vda: /i, vdb: /i}}}",
            "vms.a.images names one image file for two disks",
        ),
        (
            "repository: /r\nvms: {a: {qmp: /x, disks: [vda, vdb], images: {vda: /i}}}",
            "vms.a.disks names vdb, which vms.a.images does not have",
        ),
        ('repository: /r\nvms: {a: {qmp: /x, images: {vda: "/i\\0"}}}', "holds a NUL"),
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


def test_images_paths_and_formats(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
repository: /r
vms:
  a:
    qmp: /run/a.qmp
    images:
      vda: /var/lib/vms/a-vda.qcow2
      vdb: {path: images/a-vdb.img, format: raw}
      vdc: {path: a-vdc.qcow2}
  b: {qmp: /run/b.qmp}
""",
        )
    )
    images = config.vm("a").images
    assert [(i.disk, i.path, i.format) for i in images] == [
        ("vda", Path("/var/lib/vms/a-vda.qcow2"), "qcow2"),
        ("vdb", tmp_path / "images" / "a-vdb.img", "raw"),
        ("vdc", tmp_path / "a-vdc.qcow2", "qcow2"),
    ]
    assert config.vm("b").images == ()

"""Encrypted backups on real qemu: LUKS qcow2 files that stock qemu opens with the key
and nothing else does; every point restores and serves byte-identically; verify proves
the ciphertext; a wrong key stops every command with exit 2; rekey changes the key of
every file; prune merges encrypted chains; an encrypted and a plain VM share a
repository."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

import nbdclient
from backupd.config import load_config
from backupd.keys import keygen, vm_key
from backupd.merge.execute import merge_vm
from backupd.repository import Repository
from integration.conftest import MiB, backupd, restore_backup, serving, write_config
from integration.harness.chain import backing_of, backups, first_difference, image_info
from integration.harness.digest_runs import first_run
from integration.harness.vm import QemuVM

#: the byte patterns the guest writes (none may appear in any backup file)
PATTERNS = (0x5A, 0x61, 0x62, 0x63, 0x71, 0x72, 0x73, 0x3C)


def make_key(folder: Path, name: str = "backupd.key") -> Path:
    path = folder / name
    keygen(path)
    return path


def encrypted_config(config_for: Callable[..., Path], vm: QemuVM, key: Path) -> Path:
    """A configuration of its own (beside the key) backing up ``vm`` with ``key``."""
    path = config_for(vm, encryption={"key_file": str(key), "iter_time": 0.05})
    return path.rename(key.with_name(f"{key.stem}-config.yaml"))


def qemu_read(image: Path, key: Path, tmp: Path) -> bytes:
    """The guest bytes of ``image``, read by stock qemu-img with the key (the backing
    chain through the names in the files, each opened with the same secret)."""
    out = tmp / f"stock-{image.parent.name}.raw"
    depth = 0
    probe: Path | None = image
    while probe is not None:  # one key-secret option per file of the chain
        backing = backing_of(probe)
        probe = (probe.parent / backing).resolve() if backing else None
        depth += 1
    secrets = ",".join(f"{'backing.' * level}encrypt.key-secret=s0" for level in range(depth))
    subprocess.run(
        [
            "qemu-img", "convert", "--object", f"secret,id=s0,file={key}", "--image-opts",
            f"driver=qcow2,file.filename={image},{secrets}", "-O", "raw", str(out),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data


async def encrypted_chain(vm: QemuVM, config: Path, rounds: int = 3) -> list[bytes]:
    """A full and rounds-1 incrementals of vda, with writes, zero-writes and discards
    between them; the model of vda at every point."""
    points = []
    await vm.write("vda", 0, 3 * MiB, PATTERNS[0])
    await vm.write("vda", 20 * MiB + 4096, 8192, PATTERNS[7])  # unaligned in a cluster
    for r in range(rounds):
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        assert ("kind=full" if r == 0 else "kind=incremental") in result.stderr, result.stderr
        points.append(vm.snapshot()["vda"])
        await vm.write("vda", (5 + r) * MiB, 65536, PATTERNS[1 + r % 3])
        await vm.write("vda", r * MiB, 4096, PATTERNS[4 + r % 3])
        if r == 1:
            await vm.write_zeroes("vda", 2 * MiB, 65536)
            await vm.discard("vda", MiB, 65536)
    return points


async def test_encrypted_chain_is_qcow2_luks_that_stock_qemu_reads(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    key = make_key(tmp_path)
    assert key.stat().st_mode & 0o777 == 0o400 and len(key.read_bytes()) == 64
    config = encrypted_config(config_for, vm, key)
    points = await encrypted_chain(vm, config)
    found = backups(tmp_path / "repo")
    assert len(found) == 3
    for folder in found:
        image = folder / "vda.qcow2"
        info = image_info(image)
        assert info["encrypted"] is True
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        raw = image.read_bytes()
        for pattern in PATTERNS:
            assert bytes([pattern]) * 32 not in raw, (folder.name, hex(pattern))
        record = json.loads((folder / "manifest.json").read_text())["disks"]["vda"]
        assert record["encrypted"] is True and record["digest_algorithm"] == "blake3-keyed"
    # stock qemu-img, no backupd: the newest point with the key file
    newest = qemu_read(found[-1] / "vda.qcow2", key, tmp_path)
    assert first_difference(newest, points[-1]) is None
    # backupd restore and serve of every point
    for folder, expected in zip(found, points, strict=True):
        out = tmp_path / f"{folder.name}.raw"
        result = restore_backup(config, folder.name, out)
        assert result.returncode == 0, result.stderr
        assert first_difference(out.read_bytes(), expected) is None, folder.name
        with serving(config, "--backup", folder.name) as uri:
            async with await nbdclient.connect(uri) as client:
                served = bytearray(client.size)
                for offset in range(0, client.size, 4 * MiB):
                    served[offset : offset + 4 * MiB] = await client.pread(4 * MiB, offset)
        assert first_difference(bytes(served), expected) is None, folder.name
    verified = backupd(config, "verify", "--vm", "guest1", "--all")
    assert verified.returncode == 0, verified.stderr


def flip_first_data_byte(folder: Path) -> int:
    """Flip one ciphertext byte of the first digest run of vda; its guest offset."""
    run = first_run(json.loads((folder / "manifest.json").read_text())["disks"]["vda"])
    host, _, guest, _ = run
    with open(folder / "vda.qcow2", "r+b") as f:
        f.seek(host + 100)
        byte = f.read(1)
        f.seek(host + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    return int(guest)


async def test_wrong_key_flipped_byte_and_rekey(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    key = make_key(tmp_path)
    config = encrypted_config(config_for, vm, key)
    points = await encrypted_chain(vm, config, rounds=2)
    found = backups(tmp_path / "repo")
    # a wrong key: one line, exit 2, nothing written
    wrong = make_key(tmp_path, "wrong.key")
    wrong_config = encrypted_config(config_for, vm, wrong)
    out = tmp_path / "wrong.raw"
    for args in (
        ("restore", "--vm", "guest1", "--disk", "vda", "--output", str(out)),
        ("verify", "--vm", "guest1"),
        ("run", "--vm", "guest1", "--incremental"),
        ("run", "--vm", "guest1"),
    ):
        result = backupd(wrong_config, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "key" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 or args[0] == "run", result.stderr
    assert not out.exists() and len(backups(tmp_path / "repo")) == 2
    # an unsafe key file is refused before anything happens
    os.chmod(key, 0o644)
    unsafe = backupd(config, "verify", "--vm", "guest1")
    assert unsafe.returncode == 2 and "mode 0644" in unsafe.stderr, unsafe.stderr
    os.chmod(key, 0o400)
    # rekey: the new key opens every file, the old one none, data untouched
    new = make_key(tmp_path, "new.key")
    rekeyed = backupd(config, "rekey", "--vm", "guest1", "--new-key-file", str(new))
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert "2 files rekeyed" in rekeyed.stderr, rekeyed.stderr
    again = backupd(config, "rekey", "--vm", "guest1", "--new-key-file", str(new))
    assert again.returncode == 0 and "2 had the new key already" in again.stderr, again.stderr
    new_config = encrypted_config(config_for, vm, new)
    old_config = config
    for folder, expected in zip(found, points, strict=True):
        raw = tmp_path / f"new-{folder.name}.raw"
        result = restore_backup(new_config, folder.name, raw)
        assert result.returncode == 0, result.stderr
        assert first_difference(raw.read_bytes(), expected) is None
        stale = restore_backup(old_config, folder.name, tmp_path / "stale.raw")
        assert stale.returncode == 2, stale.stderr
        assert not (tmp_path / "stale.raw").exists()
    assert backupd(new_config, "verify", "--vm", "guest1", "--all").returncode == 0
    # the next run continues the chain with the new key
    await vm.write("vda", 30 * MiB, 65536, 0x3D)
    after = backupd(new_config, "run", "--vm", "guest1")
    assert after.returncode == 0 and "kind=incremental" in after.stderr, after.stderr
    # one flipped byte of ciphertext: backup, disk and guest offset
    guest = flip_first_data_byte(found[0])
    damaged = backupd(new_config, "verify", "--vm", "guest1", "--all")
    assert damaged.returncode == 4, damaged.stderr
    assert f"backup {found[0].name} disk vda: stored data at guest offset {guest} " in (
        damaged.stderr
    ), damaged.stderr


async def test_prune_merges_an_encrypted_chain(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    key = make_key(tmp_path)
    config = encrypted_config(config_for, vm, key)
    points = await encrypted_chain(vm, config, rounds=6)
    ids = [f.name for f in backups(tmp_path / "repo")]
    # a gap: the second backup folded up into the third (qemu-img rebase with the key)
    settings = load_config(config).vm("guest1").encryption
    with vm_key(settings) as loaded:
        await merge_vm(
            Repository(tmp_path / "repo").vm("guest1"),
            lambda manifests: {m.id for m in manifests} - {ids[1]},
            purpose="test",
            report=lambda line: None,
            key=loaded,
        )
    assert (
        json.loads((tmp_path / "repo/guest1" / ids[2] / "manifest.json").read_text())["parent"]
        == ids[0]
    )
    raw = tmp_path / "gap.raw"
    result = restore_backup(config, ids[2], raw)
    assert result.returncode == 0 and raw.read_bytes() == points[2], result.stderr
    assert backupd(config, "verify", "--vm", "guest1", "--all").returncode == 0
    del ids[1], points[1]
    data = yaml.safe_load(config.read_text())
    data["vms"]["guest1"]["keep_last"] = 2
    config.write_text(yaml.safe_dump(data))
    result = backupd(config, "prune", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    kept = backups(tmp_path / "repo")
    assert [f.name for f in kept] == ids[3:]
    for folder in kept:
        raw = tmp_path / f"{folder.name}.raw"
        restored = restore_backup(config, folder.name, raw)
        assert restored.returncode == 0, restored.stderr
        assert first_difference(raw.read_bytes(), points[ids.index(folder.name)]) is None
        image = (folder / "vda.qcow2").read_bytes()
        assert all(bytes([p]) * 32 not in image for p in PATTERNS)
    assert qemu_read(kept[-1] / "vda.qcow2", key, tmp_path) == points[-1]
    verified = backupd(config, "verify", "--vm", "guest1", "--all")
    assert verified.returncode == 0, verified.stderr
    # merge --until on what is left: the newest becomes a full
    merged = backupd(config, "merge", "--vm", "guest1", "--until", ids[4])
    assert merged.returncode == 0, merged.stderr
    assert json.loads((backups(tmp_path / "repo")[0] / "manifest.json").read_text())["kind"] == (
        "full"
    )
    assert backupd(config, "verify", "--vm", "guest1", "--all").returncode == 0


async def test_encrypted_and_plain_vms_share_a_repository(tmp_path: Path, sockdir: Path) -> None:
    key = make_key(tmp_path)
    machines = []
    try:
        for name in ("secret", "plain"):
            folder = tmp_path / name
            folder.mkdir()
            sockets = sockdir / name
            sockets.mkdir()
            machine = QemuVM(folder / "vm", {"vda": 16 * MiB}, sockdir=sockets)
            machine.workdir.mkdir()
            await machine.start()
            machines.append(machine)
            await machine.write("vda", MiB, MiB, PATTERNS[0])
        secret, plain = machines
        config = write_config(
            tmp_path / "backupd.yaml",
            tmp_path / "repo",
            {
                "secret": {"qmp": str(secret.qmp_path)},
                "plain": {"qmp": str(plain.qmp_path), "encryption": False},
            },
            scratch_dir=str(tmp_path / "scratch"),
            runtime_dir=str(sockdir),
            encryption={"key_file": str(key), "iter_time": 0.05},
        )
        for name, machine in (("secret", secret), ("plain", plain)):
            assert backupd(config, "run", "--vm", name).returncode == 0
            image = next((tmp_path / "repo" / name).glob("*/vda.qcow2")).read_bytes()
            assert (bytes([PATTERNS[0]]) * 32 in image) == (name == "plain")
            out = tmp_path / f"{name}.raw"
            result = backupd(config, "restore", "--vm", name, "--disk", "vda", "--output", str(out))
            assert result.returncode == 0, result.stderr
            assert out.read_bytes() == machine.snapshot()["vda"]
            assert backupd(config, "verify", "--vm", name).returncode == 0
    finally:
        for machine in machines:
            await machine.kill()


def test_compress_and_encryption_are_refused(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    config = write_config(
        tmp_path / "backupd.yaml",
        tmp_path / "repo",
        {"guest1": {"qmp": "/nonexistent", "compress": True}},
        encryption={"key_file": str(key)},
    )
    result = backupd(config, "list")
    assert result.returncode == 2
    assert "compress and encryption do not go together" in result.stderr, result.stderr

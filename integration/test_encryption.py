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

import pytest
import yaml

import nbdclient
from backupd.keys import keygen
from integration.conftest import MiB, backupd, serving, write_config
from integration.harness.chain import backups, first_difference
from integration.harness.vm import QemuVM

#: the byte patterns the guest writes (none may appear in any backup file)
PATTERNS = (0x5A, 0x61, 0x62, 0x63, 0x71, 0x72, 0x73, 0x3C)


def make_key(folder: Path, name: str = "backupd.key") -> Path:
    path = folder / name
    keygen(path)
    return path


def encrypted_config(config_for: Callable[..., Path], vm: QemuVM, key: Path) -> Path:
    return config_for(vm, encryption={"key_file": str(key), "iter_time": 0.05})


def qemu_read(image: Path, key: Path, tmp: Path) -> bytes:
    """The guest bytes of ``image``, read by stock qemu-img with the key (the backing
    chain through the names in the files, each opened with the same secret)."""
    out = tmp / f"stock-{image.parent.name}.raw"
    depth = 0
    probe: Path | None = image
    while probe is not None:  # one key-secret option per file of the chain
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(probe)],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        backing = info.get("backing-filename")
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
        await vm.write("vda", (5 + r) * MiB, 65536, PATTERNS[1 + r])
        await vm.write("vda", r * MiB, 4096, PATTERNS[4 + r])
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
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(image)],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
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
        result = backupd(
            config, "restore", "--vm", "guest1", "--backup", folder.name,
            "--disk", "vda", "--output", str(out),
        )  # fmt: skip
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

"""Restore through the served backup image, and list / verify / prune, on real qemu."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import nbdclient
from integration.conftest import MiB, backupd, restore_backup, serving
from integration.harness.chain import backups, make_qcow2, qemu_img_check, qemu_img_compare
from integration.harness.digest_runs import first_run, runs
from integration.harness.servers import qemu_nbd
from integration.harness.vm import QemuVM


async def make_chain(vm: QemuVM, config: Path, rounds: int = 4) -> list[bytes]:
    """A full and rounds-1 incrementals; returns the model of vda at each point."""
    points = []
    await vm.write("vda", MiB, 3 * MiB, 0x51)
    for r in range(rounds):
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        points.append(vm.snapshot()["vda"])
        await vm.write("vda", (8 + r) * MiB, 65536, 0x60 + r)
        await vm.write("vda", MiB + r * 65536, 4096, 0x70 + r)
        if r == 1:
            await vm.write_zeroes("vda", 2 * MiB, 65536)
    return points


def restore(
    config: Path, out: Path, backup: str, fmt: str = "raw", *extra: str
) -> subprocess.CompletedProcess[str]:
    return restore_backup(config, backup, out, "--format", fmt, *extra)


async def test_every_point_restores_exactly(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config)
    found = backups(tmp_path / "repo")
    for folder, expected in zip(found, points, strict=True):
        model = tmp_path / f"model-{folder.name}.raw"
        model.write_bytes(expected)
        raw = tmp_path / f"{folder.name}.raw"
        result = restore(config, raw, folder.name)
        assert result.returncode == 0, result.stderr
        assert raw.read_bytes() == expected
        assert raw.stat().st_blocks * 512 <= 6 * MiB  # thin: about the data, not 32 MiB
        qcow = tmp_path / f"{folder.name}.qcow2"
        result = restore(config, qcow, folder.name, "qcow2")
        assert result.returncode == 0, result.stderr
        cmp = qemu_img_compare(qcow, model, fmt_b="raw")
        assert cmp.returncode == 0, cmp.stdout
        qemu_img_check(qcow)
    again = restore(config, tmp_path / f"{found[0].name}.raw", found[0].name)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (
        restore(
            config, tmp_path / f"{found[0].name}.raw", found[0].name, "raw", "--force"
        ).returncode
        == 0
    )
    listing = json.loads(backupd(config, "list", "--vm", "guest1", "--json").stdout)
    assert [b["id"] for b in listing] == [f.name for f in found]
    assert [b["kind"] for b in listing] == ["full"] + ["incremental"] * 3
    assert listing[1]["parent"] == listing[0]["id"] and listing[0]["disks"] == ["vda"]
    assert all(b["created"].endswith("Z") for b in listing)
    bad = backupd(
        config,
        "restore",
        "--vm",
        "guest1",
        "--backup",
        "20200101T000000Z",
        "--disk",
        "vda",
        "--output",
        str(tmp_path / "x.raw"),
    )
    assert bad.returncode == 1 and "has no backup 20200101T000000Z" in bad.stderr
    bad = backupd(
        config, "restore", "--vm", "guest1", "--disk", "vdq", "--output", str(tmp_path / "x.raw")
    )
    assert bad.returncode == 1 and "no disk 'vdq'" in bad.stderr
    assert not (tmp_path / "x.raw").exists()


async def test_serve_for_nbdinfo_qemu_img_and_qemu(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config, rounds=2)
    sock = sockdir / "serve.sock"
    with serving(config, "--socket", str(sock)) as uri:
        assert uri == f"nbd+unix:///vda?socket={sock}"
        mapped = json.loads(
            subprocess.run(
                ["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True
            ).stdout
        )
        data = [(e["offset"], e["length"]) for e in mapped if not e["type"] & 2]
        assert data and sum(n for _, n in data) <= 5 * MiB  # zeros stay holes
        out = tmp_path / "served.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", uri, str(out)], check=True)
        assert out.read_bytes() == points[-1]
        # a VM booting from its backup: qemu reads the served image as a block device
        reader = QemuVM(tmp_path / "reader", {}, sockdir=sockdir / "r")
        (sockdir / "r").mkdir()
        reader.workdir.mkdir()
        await reader.start()
        try:
            await reader.hmp(
                f"drive_add 0 if=none,id=restored,file.driver=nbd,"
                f"file.server.type=unix,file.server.path={sock},"
                "file.export=vda,driver=raw,read-only=on"
            )
            await reader.hmp('qemu-io restored "read -P 0x51 3M 64k"')
            await reader.hmp('qemu-io restored "read -P 0x60 8M 64k"')
            output = (reader.workdir / "qemu.out").read_text()
            assert output.count("read 65536/65536 bytes") == 2, output
            assert "failed" not in output
        finally:
            await reader.kill()
    assert not sock.exists()


async def test_restore_into_nbd_target(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config, rounds=2)
    target = tmp_path / "new.qcow2"
    make_qcow2(target, "32M", "write -P 0x99 0 32M")  # stale data must vanish
    with qemu_nbd(target, sockdir / "t.sock", read_only=False, export="vda") as uri:
        result = backupd(config, "restore", "--vm", "guest1", "--disk", "vda", "--to", uri)
        assert result.returncode == 0, result.stderr
    model = tmp_path / "model.raw"
    model.write_bytes(points[-1])
    cmp = qemu_img_compare(target, model, fmt_b="raw")
    assert cmp.returncode == 0, cmp.stdout
    small = tmp_path / "small.qcow2"
    make_qcow2(small, "16M")
    with qemu_nbd(small, sockdir / "s.sock", read_only=False) as uri:
        result = backupd(config, "restore", "--vm", "guest1", "--disk", "vda", "--to", uri)
    assert result.returncode == 1 and "smaller than the disk" in result.stderr


async def test_verify_finds_damage(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    await make_chain(vm, config, rounds=3)
    assert backupd(config, "verify", "--vm", "guest1", "--all").returncode == 0
    found = backups(tmp_path / "repo")
    # a manifest of the earlier sha256 form (no algorithm named) is still verified
    legacy = json.loads((found[0] / "manifest.json").read_text())
    record = legacy["disks"]["vda"]
    assert record.pop("digest_algorithm") == "blake3"
    rows = runs(record)
    with open(found[0] / "vda.qcow2", "rb") as f:
        for run in rows:
            f.seek(run[0])
            run[3] = hashlib.sha256(f.read(run[1])).hexdigest()
    # the earlier form of the runs too: JSON lists (format 1)
    legacy["format"] = 1
    record["digests"] = rows
    (found[0] / "manifest.json").write_text(json.dumps(legacy))
    assert backupd(config, "verify", "--vm", "guest1", "--backup", found[0].name).returncode == 0
    good = record["digests"][-1][3]
    record["digests"][-1][3] = hashlib.sha256(b"something else").hexdigest()
    (found[0] / "manifest.json").write_text(json.dumps(legacy))
    result = backupd(config, "verify", "--vm", "guest1", "--backup", found[0].name)
    assert result.returncode == 4 and "does not match its digest" in result.stderr
    record["digests"][-1][3] = good
    (found[0] / "manifest.json").write_text(json.dumps(legacy))
    victim = found[1]
    manifest = json.loads((victim / "manifest.json").read_text())
    host, length, guest, _ = first_run(manifest["disks"]["vda"])
    path = victim / "vda.qcow2"
    with open(path, "r+b") as f:
        f.seek(host + length // 2)
        byte = f.read(1)
        f.seek(host + length // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    result = backupd(config, "verify", "--vm", "guest1", "--all")
    assert result.returncode == 4
    assert f"backup {victim.name} disk vda: stored data at guest offset {guest}" in result.stderr
    assert "1 of 3 backups damaged" in result.stderr
    with open(found[2] / "vda.qcow2", "r+b") as f:
        f.truncate(65536 * 2)
    result = backupd(config, "verify", "--vm", "guest1", "--backup", found[2].name)
    assert result.returncode == 4 and "DAMAGED" in result.stderr
    # a crafted backing path is refused, never followed
    subprocess.run(
        [
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            str(victim / "vda.qcow2"),
        ],
        check=True,
    )
    result = backupd(
        config,
        "restore",
        "--vm",
        "guest1",
        "--backup",
        victim.name,
        "--disk",
        "vda",
        "--output",
        str(tmp_path / "evil.raw"),
    )
    # (qemu-img rebase also wrote extensions backupd never writes: refused by the gate)
    assert result.returncode == 1 and "refusing to open it" in result.stderr
    assert not (tmp_path / "evil.raw").exists()


async def test_prune_across_chains(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config, rounds=3)
    assert backupd(config, "run", "--vm", "guest1", "--full").returncode == 0
    points.append(vm.snapshot()["vda"])
    await vm.write("vda", 20 * MiB, 65536, 0x7F)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    points.append(vm.snapshot()["vda"])
    data = yaml.safe_load(config.read_text())
    data["vms"]["guest1"]["keep_last"] = 1
    config.write_text(yaml.safe_dump(data))
    before = backups(tmp_path / "repo")
    dry = backupd(config, "prune", "--vm", "guest1", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("would remove") == 3  # the old chain
    assert f"{before[3].name}  would merge into {before[4].name}" in dry.stdout
    assert backups(tmp_path / "repo") == before
    result = backupd(config, "prune", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    kept = backups(tmp_path / "repo")  # exactly what keep_last selects
    assert [k.name for k in kept] == [before[4].name]
    for folder, expected in zip(kept, points[4:], strict=True):
        out = tmp_path / f"p-{folder.name}.raw"
        assert restore(config, out, folder.name).returncode == 0
        assert out.read_bytes() == expected
    assert backupd(config, "run", "--vm", "guest1").returncode == 0  # the chain goes on


@pytest.mark.parametrize("verb", ["list", "status"])
async def test_list_and_status_without_backups(
    vm: QemuVM, config_for: Callable[..., Path], verb: str
) -> None:
    config = config_for(vm)
    result = backupd(config, verb, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == [] if verb == "list" else data[0]["last_success"] is None


async def test_serve_over_tcp_needs_tls(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    from integration.harness.servers import free_port, make_certificates

    config = config_for(vm)
    points = await make_chain(vm, config, rounds=1)
    refused = backupd(config, "serve", "--vm", "guest1", "--listen", "127.0.0.1:10809")
    assert refused.returncode == 2 and "--tls-dir" in refused.stderr
    certs = make_certificates(tmp_path / "pki")
    port = free_port()
    with serving(config, "--listen", f"127.0.0.1:{port}", "--tls-dir", str(certs)) as uri:
        assert uri == f"nbds://127.0.0.1:{port}/vda"
        with pytest.raises(nbdclient.NegotiationError):  # no plaintext
            await nbdclient.connect(f"nbd://127.0.0.1:{port}/vda")
        async with await nbdclient.connect(f"{uri}?tls-certificates={certs}") as client:
            assert client.tls
            data = await client.pread(client.size, 0)
        assert data == points[-1]

"""An S3 repository against a real server (OpenStack Swift with s3api) and a real qemu:
backups streamed into the bucket restore byte-identically at every point (raw, qcow2,
an NBD target), ``serve`` feeds qemu-img and nbdinfo, verify finds a flipped byte in an
object, prune rewrites what it keeps, ``copy`` round-trips local -> S3 -> local and
resumes after SIGKILL, and every failure (bad credentials, missing bucket, endpoint
down, server stopped mid-upload, SIGKILL mid-upload, quota) is one line, exit 1,
nothing visible, and the next run has every change and leaves no orphan behind."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from backupd.objectstore import ObjectStore
from integration.conftest import S3_PREFIX, MiB, backupd, restore_backup, serving
from integration.harness.chain import first_difference, qemu_img_check, qemu_img_compare
from integration.harness.digest_runs import runs
from integration.harness.runs import argv
from integration.harness.s3server import SwiftS3Server
from integration.harness.servers import qemu_nbd
from integration.harness.vm import QemuVM

pytestmark = pytest.mark.s3
PREFIX = S3_PREFIX
CLUSTER = 65536


def ok(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = backupd(config, *args)
    assert result.returncode == 0, result.stderr
    return result


def ids(config: Path) -> list[str]:
    return [row["id"] for row in json.loads(ok(config, "list", "--json").stdout)]


def committed(result: subprocess.CompletedProcess[str]) -> str:
    """The backup id a run's summary line names."""
    return result.stderr.split(" backup=", 1)[1].split()[0]


def restore_raw(config: Path, backup: str, out: Path) -> bytes:
    result = restore_backup(config, backup, out)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    out.unlink()
    return data


async def keys(store: ObjectStore) -> list[str]:
    return [info.key async for info in store.list_objects("")]


async def changes(vm: QemuVM, rng: random.Random, round_: int) -> None:
    """Data, an overwrite, zeros over data and a discard: what an incremental must carry."""
    for _ in range(4):
        await vm.write(
            "vda", rng.randrange(0, 32 * MiB // CLUSTER) * CLUSTER, CLUSTER, 0x40 + round_
        )
    await vm.write("vda", round_ * MiB + 4096, 8192, 0x60 + round_)  # unaligned in a cluster
    await vm.write_zeroes("vda", rng.randrange(0, 4) * MiB, CLUSTER)
    await vm.discard("vda", rng.randrange(8, 12) * MiB, CLUSTER)


async def make_points(vm: QemuVM, config: Path, rounds: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    await vm.write("vda", 0, 6 * MiB, 0x11)
    points: dict[str, bytes] = {}
    for round_ in range(rounds):
        result = ok(config, "run", "--vm", "guest1")
        assert ("kind=full" if round_ == 0 else "kind=incremental") in result.stderr
        points[committed(result)] = vm.snapshot()["vda"]
        await changes(vm, rng, round_)
    return points


def data_clusters(data: bytes) -> set[int]:
    return {
        i for i in range(len(data) // CLUSTER) if data[i * CLUSTER : (i + 1) * CLUSTER].strip(b"\0")
    }


def mapped_data(uri: str) -> set[int]:
    """The clusters nbdinfo's map says hold data."""
    out = subprocess.run(
        ["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True
    )
    found: set[int] = set()
    for extent in json.loads(out.stdout):
        if not extent["type"] & 2:  # not zero
            first = extent["offset"] // CLUSTER
            found |= set(range(first, first + extent["length"] // CLUSTER))
    return found


async def test_points_restore_serve_and_verify_from_s3(
    vm: QemuVM,
    s3_config: Callable[..., Path],
    bucket: ObjectStore,
    tmp_path: Path,
    sockdir: Path,
    s3server: SwiftS3Server,
) -> None:
    config = s3_config()
    points = await make_points(vm, config, rounds=3)
    backups = sorted(points)
    assert ids(config) == backups
    # nothing of the backups was staged on the local disk, and no scratch file is left
    assert not (tmp_path / "repo").exists()
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]
    stored = await keys(bucket)
    assert f"{PREFIX}/guest1/{backups[0]}/vda.qcow2" in stored
    assert not [k for k in stored if k.endswith(".lease")]
    status = ok(config, "status", "--json")
    row = json.loads(status.stdout)[0]
    assert (row["last_result"], row["backups"], row["chain_length"]) == ("ok", 3, 2)
    assert s3server.secret_access_key not in status.stdout + status.stderr
    # every point, raw; one as qcow2; one into an NBD target
    for backup, expected in points.items():
        data = restore_raw(config, backup, tmp_path / "out.raw")
        assert first_difference(data, expected) is None, backup
    qcow2 = tmp_path / "point.qcow2"
    ok(config, "restore", "--vm", "guest1", "--backup", backups[1], "--disk", "vda",
       "--output", str(qcow2), "--format", "qcow2")  # fmt: skip
    qemu_img_check(qcow2)
    model = tmp_path / "model.raw"
    model.write_bytes(points[backups[1]])
    assert qemu_img_compare(qcow2, model, fmt_b="raw").returncode == 0
    disk = tmp_path / "new.raw"
    disk.write_bytes(b"\x99" * (32 * MiB))  # stale data must vanish
    with qemu_nbd(disk, sockdir / "t.sock", fmt="raw", read_only=False, export="vda") as uri:
        ok(config, "restore", "--vm", "guest1", "--disk", "vda", "--to", uri)
    assert first_difference(disk.read_bytes(), points[backups[-1]]) is None
    # serve: qemu-img and nbdinfo read the point from the bucket
    with serving(config, "--backup", backups[-1]) as uri:
        copy = tmp_path / "served.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", uri, str(copy)], check=True)
        assert first_difference(copy.read_bytes(), points[backups[-1]]) is None
        assert mapped_data(uri) == data_clusters(points[backups[-1]])
    # verify reads every digest; a byte flipped in an object is found
    verified = ok(config, "verify", "--vm", "guest1", "--all")
    assert verified.stderr.count(": ok (") == 3, verified.stderr
    key = f"{PREFIX}/guest1/{backups[0]}/vda.qcow2"
    manifest = json.loads(await bucket.get(f"{PREFIX}/guest1/{backups[0]}/manifest.json"))
    host, length, guest, _ = runs(manifest["disks"]["vda"])[1]
    image = bytearray(await bucket.get(key))
    image[host + length // 2] ^= 0x01
    await bucket.put(key, image)
    damaged = backupd(config, "verify", "--vm", "guest1", "--all")
    assert damaged.returncode == 4, damaged.stderr
    assert f"{backups[0]} disk vda: stored data at guest offset {guest}" in damaged.stderr
    assert damaged.stderr.count(f"but depends on damaged {backups[0]}") == 2, damaged.stderr


async def test_prune_rewrites_the_kept_backups(
    vm: QemuVM, s3_config: Callable[..., Path], bucket: ObjectStore, tmp_path: Path
) -> None:
    config = s3_config(vm_settings={"keep_last": 2})
    points = await make_points(vm, config, rounds=4, seed=2)
    backups = sorted(points)
    pruned = ok(config, "prune", "--vm", "guest1")
    assert f"{backups[1]}  merge into {backups[2]}" in pruned.stdout
    assert ids(config) == backups[2:]
    rows = json.loads(ok(config, "list", "--json").stdout)
    assert [(r["kind"], r["parent"]) for r in rows] == [("full", None), ("incremental", backups[2])]
    for backup in backups[2:]:
        data = restore_raw(config, backup, tmp_path / "out.raw")
        assert first_difference(data, points[backup]) is None, backup
    ok(config, "verify", "--vm", "guest1", "--all")
    stored = await keys(bucket)
    assert not [k for k in stored if backups[0] in k or backups[1] in k or k.endswith(".new")]
    # the newest backup kept its bitmap: the next run is still an incremental
    assert "kind=incremental" in ok(config, "run", "--vm", "guest1").stderr


async def test_copy_round_trips_and_resumes_after_sigkill(
    vm: QemuVM,
    s3_config: Callable[..., Path],
    bucket: ObjectStore,
    tmp_path: Path,
    s3bucket: str,
) -> None:
    local = s3_config(name="local.yaml", repository=str(tmp_path / "repo"))
    rng = random.Random(3)
    await vm.write("vda", 0, 12 * MiB, 0x21)
    points: list[bytes] = []
    for round_ in range(3):
        ok(local, "run", "--vm", "guest1")
        points.append(vm.snapshot()["vda"])
        await changes(vm, rng, round_)
    url = f"s3://{s3bucket}/{PREFIX}"
    # killed in the middle of the second backup's image: the first is in, nothing else
    env = {**os.environ, "BACKUPD_FAULT": "copy-mid-image@3"}
    killed = subprocess.run(argv(local, "copy", "--vm", "guest1", "--to", url), env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    s3 = s3_config(name="s3.yaml")
    originals = sorted(p.name for p in (tmp_path / "repo" / "guest1").iterdir() if p.name[0] == "2")
    assert ids(s3) == originals[:1]
    resumed = ok(local, "copy", "--vm", "guest1", "--to", url)
    assert "copied=2 present=1 failed=0" in resumed.stderr
    assert ids(s3) == originals
    assert not [u async for u in _pending(bucket)]
    ok(s3, "verify", "--vm", "guest1", "--all")
    again = ok(local, "copy", "--vm", "guest1", "--to", url)
    assert "copied=0 present=3" in again.stderr
    # and back into a local folder: the very same files
    back = tmp_path / "back"
    ok(s3, "copy", "--vm", "guest1", "--to", str(back))
    for backup in originals:
        for name in ("vda.qcow2", "manifest.json"):
            a = (tmp_path / "repo" / "guest1" / backup / name).read_bytes()
            b = (back / "guest1" / backup / name).read_bytes()
            assert a == b if name.endswith("qcow2") else json.loads(a) == json.loads(b)
    assert (back / "guest1" / originals[-1] / "vda.qcow2").stat().st_mode & 0o777 == 0o600


async def _pending(store: ObjectStore) -> AsyncIterator[str]:
    for upload in await store.pending_uploads(""):
        yield upload.key


async def test_failures_are_one_line_and_the_next_run_has_every_change(
    vm: QemuVM,
    s3_config: Callable[..., Path],
    bucket: ObjectStore,
    s3server: SwiftS3Server,
    tmp_path: Path,
) -> None:
    config = s3_config()
    points = await make_points(vm, config, rounds=1, seed=4)

    def fails(config: Path, said: str) -> str:
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert errors and said in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert s3server.secret_access_key not in result.stderr
        return result.stderr

    bad = s3_config(name="bad.yaml", s3={"secret_access_key": "not-the-key"})
    fails(bad, "refused the credentials")
    fails(s3_config(name="nobucket.yaml", bucket="no-such-bucket"), "does not exist")
    s3server.stop_endpoint()
    try:
        fails(config, "unreachable")
    finally:
        s3server.start_endpoint()
    assert ids(config) == sorted(points)
    # the endpoint goes away while the image is being uploaded
    await vm.write("vda", 8 * MiB, 8 * MiB, 0x77)
    env = {**os.environ, "BACKUPD_FAULT": "mid-copy:pause"}
    proc = subprocess.Popen(argv(config, "run", "--vm", "guest1"), env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(200):
            if [k async for k in _pending(bucket)]:
                break
            await asyncio.sleep(0.05)
        s3server.stop_endpoint()
        _, stderr = proc.communicate(timeout=120)
    finally:
        s3server.start_endpoint()
    assert proc.returncode == 1, stderr
    assert "unreachable" in stderr and "Traceback" not in stderr
    assert ids(config) == sorted(points)
    assert [k async for k in _pending(bucket)]  # left behind: the endpoint was down
    # SIGKILL mid-upload
    await vm.write("vda", 24 * MiB, 6 * MiB, 0x78)
    env = {**os.environ, "BACKUPD_FAULT": "mid-copy@20"}
    killed = subprocess.run(argv(config, "run", "--vm", "guest1"), env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9
    assert ids(config) == sorted(points)
    assert [k async for k in _pending(bucket)]
    # a quota the next backup does not fit in (Swift keeps parts in <bucket>+segments);
    # that run first removes what the killed one left
    for container in (bucket.bucket, f"{bucket.bucket}+segments"):
        s3server.set_bucket_quota(container, 4 * MiB)
    refused = fails(config, "over quota")
    assert "removing uncommitted backup" in refused and "unfinished uploads" in refused
    for container in (bucket.bucket, f"{bucket.bucket}+segments"):
        s3server.set_bucket_quota(container, 1 << 40)
    assert ids(config) == sorted(points)
    # the next run removes what the failed ones left and has every change
    result = ok(config, "run", "--vm", "guest1")
    assert "kind=incremental" in result.stderr
    latest = ids(config)[-1]
    data = restore_raw(config, latest, tmp_path / "out.raw")
    assert first_difference(data, vm.snapshot()["vda"]) is None
    assert not [k async for k in _pending(bucket)]
    stored = await keys(bucket)
    committed = {k.rsplit("/", 2)[-2] for k in stored if k.endswith("manifest.json")}
    assert {k.rsplit("/", 2)[-2] for k in stored if "/guest1/2" in k} == committed
    assert not [k for k in stored if k.endswith(".lease")]

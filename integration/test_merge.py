"""Prune merges instead of keeping whole chains, on real qemu: afterwards the repository
holds exactly what the policy selects, every kept point restores byte-identically, the
merged full verifies against its digests, the next run is still an incremental, and a
kill at any step of a merge loses nothing (the next prune finishes it)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from backupd.config import load_config
from backupd.manifest import Manifest
from backupd.merge.execute import merge_vm
from backupd.repository import Repository
from integration.conftest import MiB, backupd
from integration.faults_table import record
from integration.harness.chain import backups, first_difference, qemu_img_check, read_image
from integration.harness.digest_runs import runs
from integration.harness.runs import argv
from integration.harness.vm import QemuVM

FAULTS = [
    "merge-after-journal",
    "merge-after-qemu-img",
    "merge-before-exchange",
    "merge-mid-exchange",
    "merge-before-manifest",
    "merge-after-exchange",
    "merge-mid-remove",
    "merge-done",
]


async def chain_of_seven(vm: QemuVM, config: Path, rng: random.Random) -> dict[str, bytes]:
    """A full and 6 incrementals, with writes, zero-writes and discards between them;
    returns the model of the disk at every point, by backup id."""
    points: dict[str, bytes] = {}
    await vm.write("vda", 0, 8 * MiB, 0x11)
    for round_ in range(7):
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        assert ("kind=full" if round_ == 0 else "kind=incremental") in result.stderr
        points[backups(config.parent / "repo")[-1].name] = vm.snapshot()["vda"]
        for _ in range(6):
            await vm.write("vda", rng.randrange(0, 32 * MiB // 65536) * 65536, 65536, round_ + 2)
        await vm.write_zeroes("vda", rng.randrange(0, 8) * MiB, 65536)
        await vm.discard("vda", rng.randrange(8, 16) * MiB, 65536)
    return points


def set_retention(config: Path, **policy: int) -> None:
    data = yaml.safe_load(config.read_text())
    data["vms"]["guest1"].update(policy)
    config.write_text(yaml.safe_dump(data))


def manifest(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "manifest.json").read_text())
    return data


def restores_exactly(folder: Path, expected: bytes, tmp: Path) -> bool:
    qemu_img_check(folder / "vda.qcow2")
    return first_difference(read_image(folder / "vda.qcow2", tmp), expected) is None


async def test_prune_keep_last_two_merges_into_a_full(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    points = await chain_of_seven(vm, config, random.Random(7))
    repo = tmp_path / "repo"
    sizes = [(f / "vda.qcow2").stat().st_size for f in backups(repo)]
    full_inode = (backups(repo)[0] / "vda.qcow2").stat().st_ino
    set_retention(config, keep_last=2)
    dry = backupd(config, "prune", "--vm", "guest1", "--dry-run")
    ids = sorted(points)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(f"would merge into {ids[5]}") == 5
    assert f"{ids[5]}  keep (becomes a full)" in dry.stdout and f"{ids[6]}  keep" in dry.stdout
    assert [f.name for f in backups(repo)] == ids  # a dry run changes nothing
    result = backupd(config, "prune", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert "merged " in result.stderr and f"into {ids[5]} (now a full)" in result.stderr
    kept = backups(repo)
    assert [f.name for f in kept] == ids[5:]
    assert manifest(kept[0])["kind"] == "full" and manifest(kept[0])["parent"] is None
    assert manifest(kept[1])["parent"] == ids[5]
    for folder in kept:
        assert restores_exactly(folder, points[folder.name], tmp_path), folder.name
    listed = json.loads(backupd(config, "list", "--json").stdout)
    assert [(row["id"], row["kind"]) for row in listed] == [
        (ids[5], "full"),
        (ids[6], "incremental"),
    ]
    # the full's own file took the merged data in place (no copy of the disk), and holds
    # about the full plus what the increments changed: less than the sum of all files
    full, last = (f / "vda.qcow2" for f in kept)
    assert full.stat().st_ino == full_inode
    assert full.stat().st_size <= sizes[0] + sum(sizes[1:6])
    assert full.stat().st_size + last.stat().st_size < sum(sizes)
    verified = backupd(config, "verify", "--vm", "guest1", "--all")
    assert verified.returncode == 0, verified.stderr
    await vm.write("vda", 20 * MiB, 65536, 0x7E)
    after = backupd(config, "run", "--vm", "guest1")
    assert after.returncode == 0 and "kind=incremental" in after.stderr, after.stderr
    newest = backups(repo)[-1]
    assert restores_exactly(newest, vm.snapshot()["vda"], tmp_path)


async def test_a_flipped_byte_in_a_merged_full_is_found(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    points = await chain_of_seven(vm, config, random.Random(8))
    set_retention(config, keep_last=1)
    assert backupd(config, "prune", "--vm", "guest1").returncode == 0
    (only,) = backups(tmp_path / "repo")
    assert restores_exactly(only, points[only.name], tmp_path)
    rows = runs(manifest(only)["disks"]["vda"])  # type: ignore[index]
    host, length, guest, _ = rows[len(rows) // 2]
    with open(only / "vda.qcow2", "r+b") as image:
        image.seek(host + length // 2)
        byte = image.read(1)
        image.seek(host + length // 2)
        image.write(bytes([byte[0] ^ 0x40]))
    result = backupd(config, "verify", "--vm", "guest1", "--all")
    assert result.returncode == 4, result.stderr
    assert f"{only.name}: DAMAGED" in result.stderr and "vda" in result.stderr
    assert f"guest offset {guest}" in result.stderr, result.stderr


async def test_gaps_are_merged_up_and_merge_until(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    """Kept backups with dropped ones between them (as keep_daily/weekly leave): the
    dropped ones go into the later kept one, which then builds on the earlier one."""
    config = config_for(vm)
    points = await chain_of_seven(vm, config, random.Random(9))
    ids = sorted(points)
    keep = {ids[1], ids[4], ids[6]}
    repo = Repository(load_config(config).repository).vm("guest1")

    def policy(manifests: list[Manifest]) -> set[str]:
        return keep

    plan = await merge_vm(repo, policy, purpose="test", report=lambda line: None)
    assert [f.target for f in plan.folds] == [ids[1], ids[4], ids[6]]
    kept = backups(tmp_path / "repo")
    assert [f.name for f in kept] == [ids[1], ids[4], ids[6]]
    assert [manifest(f)["parent"] for f in kept] == [None, ids[1], ids[4]]
    for folder in kept:
        assert restores_exactly(folder, points[folder.name], tmp_path), folder.name
    assert backupd(config, "verify", "--vm", "guest1", "--all").returncode == 0
    merged = backupd(config, "merge", "--vm", "guest1", "--until", ids[4])
    assert merged.returncode == 0, merged.stderr
    assert [f.name for f in backups(tmp_path / "repo")] == [ids[4], ids[6]]
    for folder in backups(tmp_path / "repo"):
        assert restores_exactly(folder, points[folder.name], tmp_path), folder.name


@pytest.mark.slow
async def test_a_killed_merge_loses_nothing(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGKILL at every step of a merge, and at random instants of a long one: every
    kept point restores exactly after each kill, and the next prune finishes the job."""
    config = config_for(vm)
    repo = tmp_path / "repo"
    set_retention(config, keep_last=2)
    rng = random.Random(11)
    trials: list[tuple[str | None, float | None]] = [(p, None) for p in FAULTS]
    trials += [(None, rng.uniform(0.05, 1.0)) for _ in range(2)]
    await vm.write("vda", 0, 4 * MiB, 0x21)  # one chain of six, copied back for every trial
    assert backupd(config, "run", "--vm", "guest1", "--full").returncode == 0
    points = {backups(repo)[-1].name: vm.snapshot()["vda"]}
    for round_ in range(5):
        await vm.write("vda", (4 + round_) * MiB, 2 * MiB, 0x30 + round_)
        assert backupd(config, "run", "--vm", "guest1").returncode == 0
        points[backups(repo)[-1].name] = vm.snapshot()["vda"]
    kept_ids = sorted(points)[-2:]
    pristine = tmp_path / "pristine"
    shutil.copytree(repo / "guest1", pristine)
    for point, delay in trials:
        shutil.rmtree(repo / "guest1")
        shutil.copytree(pristine, repo / "guest1")
        env = {**os.environ}
        if point is not None:
            env["BACKUPD_FAULT"] = point
        proc = await asyncio.create_subprocess_exec(
            *argv(config, "prune", "--vm", "guest1"), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        if delay is not None:
            await asyncio.sleep(delay)
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        await proc.wait()
        label = point or f"random instant {delay:.2f} s"
        # every kept point readable as it is now (the journal hides the dropped ones)
        lost = sum(not restores_exactly(repo / "guest1" / b, points[b], tmp_path) for b in kept_ids)
        if (repo / "guest1" / ".merge.json").exists():  # readers are told what to do
            listed = backupd(config, "list", "--vm", "guest1")
            assert "interrupted merge" in listed.stdout, f"{label}: {listed.stdout}"
            out = tmp_path / "refused.raw"
            refused = backupd(config, "restore", "--vm", "guest1", "--disk", "vda",
                              "--output", str(out))  # fmt: skip
            assert refused.returncode == 1 and "finish it first" in refused.stderr, label
        finished = backupd(config, "prune", "--vm", "guest1")
        left = [f.name for f in backups(repo)]
        lost += sum(
            not restores_exactly(repo / "guest1" / b, points[b], tmp_path) for b in kept_ids
        )
        ok = finished.returncode == 0 and left == kept_ids and lost == 0
        ok = ok and not (repo / "guest1" / ".merge.json").exists()
        record("prune killed at a step of a merge, then a prune", failed=not ok, lost=lost)
        assert finished.returncode == 0, f"{label}: {finished.stderr}"
        assert left == kept_ids, f"{label}: left {left}"
        assert lost == 0, label
        verified = backupd(config, "verify", "--vm", "guest1", "--all")
        assert verified.returncode == 0, f"{label}: {verified.stderr}"
        for backup in kept_ids:  # through backupd: manifests, the gate, the served chain
            out = tmp_path / f"{backup}.raw"
            where = ("--vm", "guest1", "--backup", backup, "--disk", "vda")
            restored = backupd(config, "restore", *where, "--output", str(out), "--force")
            assert restored.returncode == 0, f"{label}: {restored.stderr}"
            assert out.read_bytes() == points[backup], f"{label}: {backup}"

"""backupd run against a real qemu: full and incremental backups of a running VM,
checked byte for byte against the model of the guest's disks."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.conftest import MiB, backupd
from integration.harness.chain import (
    backing_of,
    backups,
    checkpoint_bitmap,
    first_difference,
    qemu_img_check,
    read_image,
)
from integration.harness.vm import QemuVM


@pytest.mark.parametrize("fleecing", ["snapshot-access", "blockdev-backup"])
async def test_full_then_incrementals(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, fleecing: str
) -> None:
    config = config_for(vm, fleecing=fleecing)
    repo = tmp_path / "repo"
    points: list[dict[str, bytes]] = []
    await vm.write("vda", 0, 3 * MiB, 0x11)
    await vm.write("vda", 20 * MiB + 4096, 8192, 0x22)  # unaligned inside a cluster
    for round_ in range(4):
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        points.append(vm.snapshot())
        # changes for the next round: data, overwrite, zeroes over data, discard
        await vm.write("vda", (5 + round_) * MiB, 65536, 0x30 + round_)
        await vm.write("vda", round_ * MiB, 4096, 0x40 + round_)
        if round_ == 1:
            await vm.write_zeroes("vda", 0, 65536)
        if round_ == 2:
            await vm.discard("vda", 2 * MiB, MiB)
    found = backups(repo)
    assert len(found) == 4
    manifests = [json.loads((p / "manifest.json").read_text()) for p in found]
    assert [m["kind"] for m in manifests] == ["full", "incremental", "incremental", "incremental"]
    assert manifests[1]["parent"] == manifests[0]["id"]
    # the full stores only data; incrementals copy only what changed
    assert manifests[0]["disks"]["vda"]["bytes_copied"] == 3 * MiB + 65536
    assert manifests[1]["disks"]["vda"]["bytes_copied"] == 2 * 65536
    for point, folder in zip(points, found, strict=True):
        image = folder / "vda.qcow2"
        qemu_img_check(image)
        data = read_image(image, tmp_path)
        assert first_difference(data, point["vda"]) is None, folder.name
        assert (folder / "vda.qcow2").stat().st_mode & 0o777 == 0o600
        assert folder.stat().st_mode & 0o777 == 0o700
    for parent, child in itertools.pairwise(found):
        assert backing_of(child / "vda.qcow2") == f"../{parent.name}/vda.qcow2"
    # only the newest bitmap is left recording, and nothing else is left in qemu
    names = [b["name"] for b in await vm.bitmaps("vda")]
    assert names == [checkpoint_bitmap(found[-1])]
    state = await vm.state()
    assert state["exports"] == [] and state["jobs"] == []
    assert state["nodes"] == ["drive-vda"]
    assert "summary: vm=guest1" in result.stderr and "result=ok" in result.stderr

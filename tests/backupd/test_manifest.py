"""Manifest round trip, the digest algorithm of each disk, and the manifests of the
earlier sha256 form."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from backupd.digests import ALGORITHM, hexdigest
from backupd.errors import RepositoryError
from backupd.manifest import DigestRun, DiskRecord, Manifest, check_digests, pack_runs


def sample(algorithm: str = ALGORITHM) -> Manifest:
    data = b"\x5a" * 65536
    return Manifest(
        id="20261125T000000Z",
        vm="guest1",
        kind="full",
        parent=None,
        created="2026-11-25T00:00:00+00:00",
        qemu_version="7.2.0",
        reason="first backup",
        quiesced=False,
        duration=1.0,
        disks={
            "vda": DiskRecord(
                name="vda",
                file="vda.qcow2",
                node="drive-vda",
                virtual_size=1 << 20,
                cluster_size=65536,
                bytes_copied=65536,
                bytes_stored=65536,
                data_extents=1,
                zero_extents=0,
                digests=(DigestRun(65536, 65536, 0, hexdigest(data, algorithm)),),
                digest_algorithm=algorithm,
                copy_seconds=1.25,
            )
        },
    )


def test_digest_vectors() -> None:
    # published test vectors of the empty input
    assert hexdigest(b"", "blake3") == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert hexdigest(memoryview(b"abc"), "sha256") == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(ValueError, match="unknown digest algorithm"):
        hexdigest(b"", "md5")


def test_round_trip_keeps_algorithm() -> None:
    manifest = sample()
    again = Manifest.from_json(manifest.to_json(), "m")
    assert again == manifest and again.disks["vda"].digest_algorithm == "blake3"


def test_manifest_without_algorithm_is_sha256() -> None:
    data = json.loads(sample("sha256").to_json())
    del data["disks"]["vda"]["digest_algorithm"]
    loaded = Manifest.from_json(json.dumps(data), "m")
    record = loaded.disks["vda"]
    assert record.digest_algorithm == "sha256"
    assert record.digests[0].digest == hashlib.sha256(b"\x5a" * 65536).hexdigest()


def test_unknown_algorithm_is_a_corrupt_manifest() -> None:
    data = json.loads(sample().to_json())
    data["disks"]["vda"]["digest_algorithm"] = "crc32"
    with pytest.raises(RepositoryError, match="unknown digest algorithm 'crc32'"):
        Manifest.from_json(json.dumps(data), "m")


@pytest.mark.parametrize(
    "row", [["65536", 65536, 0, "ab"], [65536, 65536, 0], [65536, True, 0, "ab"], "x"]
)
def test_bad_digest_row_is_a_corrupt_manifest(row: object) -> None:
    data = format1(sample())
    data["disks"]["vda"]["digests"].append(row)
    with pytest.raises(RepositoryError, match="corrupt manifest m"):
        Manifest.from_json(json.dumps(data), "m")


def format1(manifest: Manifest) -> dict[str, Any]:
    """``manifest`` as a format 1 manifest held it: digest runs as JSON lists."""
    data = json.loads(manifest.to_json())
    data["format"] = 1
    for name, disk in data["disks"].items():
        disk["digests"] = [list(run) for run in manifest.disks[name].digests]
    return data


def _damaged(change: Callable[[dict[str, Any]], object], old: bool = False) -> str:
    data = format1(sample()) if old else json.loads(sample().to_json())
    change(data)
    return json.dumps(data)


def _run(change: Callable[[list[Any]], object]) -> str:
    """A format 1 manifest whose first digest run ``change`` damaged."""
    return _damaged(lambda d: change(d["disks"]["vda"]["digests"][0]), old=True)


HOSTILE: dict[str, str] = {
    "not json": "{",
    "a list": "[]",
    "a number": "7",
    "deeply nested": "[" * 100000 + "]" * 100000,
    "huge integer text": '{"format": 1, "id": ' + "9" * 5000 + "}",
    "disks a list": _damaged(lambda d: d.update(disks=[])),
    "disks empty": _damaged(lambda d: d.update(disks={})),
    "disk a string": _damaged(lambda d: d["disks"].update(vda="x")),
    "kind a number": _damaged(lambda d: d.update(kind=5)),
    "kind unknown": _damaged(lambda d: d.update(kind="differential")),
    "id not an id": _damaged(lambda d: d.update(id="../x")),
    "id with a newline": _damaged(lambda d: d.update(id="20261125T000000Z\n")),
    "vm traversal": _damaged(lambda d: d.update(vm="../other")),
    "parent a number": _damaged(lambda d: d.update(kind="incremental", parent=7)),
    "parent newer": _damaged(lambda d: d.update(kind="incremental", parent="20261126T000000Z")),
    "parent itself": _damaged(lambda d: d.update(kind="incremental", parent="20261125T000000Z")),
    "full with a parent": _damaged(lambda d: d.update(parent="20261124T000000Z")),
    "missing field": _damaged(lambda d: d.pop("created")),
    "created with an escape": _damaged(lambda d: d.update(created="\x1b[2J")),
    "duration NaN": _damaged(lambda d: d.update(duration=float("nan"))),
    "duration infinite": _damaged(lambda d: d.update(duration=float("inf"))),
    "quiesced a string": _damaged(lambda d: d.update(quiesced="yes")),
    "source unknown": _damaged(lambda d: d.update(source="cloud")),
    "source a number": _damaged(lambda d: d.update(source=1)),
    "format true": _damaged(lambda d: d.update(format=True)),
    "file traversal": _damaged(lambda d: d["disks"]["vda"].update(file="../../x/vda.qcow2")),
    "file other disk": _damaged(lambda d: d["disks"]["vda"].update(file="vdb.qcow2")),
    "disk name traversal": _damaged(lambda d: d.update(disks={"../vda": d["disks"]["vda"]})),
    "disk name newline": _damaged(lambda d: d.update(disks={"vda\n": d["disks"]["vda"]})),
    "disk name mismatch": _damaged(lambda d: d["disks"]["vda"].update(name="vdb")),
    "virtual size negative": _damaged(lambda d: d["disks"]["vda"].update(virtual_size=-1)),
    "virtual size huge": _damaged(lambda d: d["disks"]["vda"].update(virtual_size=10**30)),
    "virtual size float": _damaged(lambda d: d["disks"]["vda"].update(virtual_size=1.5)),
    "cluster size 3": _damaged(lambda d: d["disks"]["vda"].update(cluster_size=3)),
    "bytes a bool": _damaged(lambda d: d["disks"]["vda"].update(bytes_stored=True)),
    "digests a dict": _damaged(lambda d: d["disks"]["vda"].update(digests={})),
    "run negative length": _run(lambda r: r.__setitem__(1, -1)),
    "run zero length": _run(lambda r: r.__setitem__(1, 0)),
    "run negative host": _run(lambda r: r.__setitem__(0, -5)),
    "run huge host": _run(lambda r: r.__setitem__(0, 2**64)),
    "run past the disk": _run(lambda r: r.__setitem__(2, (1 << 20) - 4096)),
    "run negative guest": _run(lambda r: r.__setitem__(2, -1)),
    "run short digest": _run(lambda r: r.__setitem__(3, "ab")),
    "run of five": _run(lambda r: r.append(1)),
    "run a dict": _damaged(lambda d: d["disks"]["vda"]["digests"].append({"a": 1}), old=True),
    "format 1 with packed runs": _damaged(lambda d: d.update(format=1)),
    "format 2 with listed runs": _damaged(lambda d: d["disks"]["vda"].update(digests=[])),
    "packed runs not base64 text": _damaged(lambda d: d["disks"]["vda"].update(digests="é" * 4)),
    "packed runs of odd length": _damaged(lambda d: d["disks"]["vda"].update(digests="QUJD=")),
    "packed runs a partial run": _damaged(lambda d: d["disks"]["vda"].update(digests="QUJD")),
    "format 3": _damaged(lambda d: d.update(format=3)),
}


def _packed(runs: list[tuple[int, int, int]]) -> str:
    digest = "ab" * 32
    return pack_runs(DigestRun(h, n, g, digest) for h, n, g in runs)


#: packed runs that are whole runs but wrong: found when the runs are used
DAMAGED_RUNS: dict[str, str] = {
    "zero length": _packed([(65536, 0, 0)]),
    "host past 2**63-1": _packed([(1 << 63, 65536, 0)]),
    "past the disk": _packed([(65536, 65536, (1 << 20) - 4096)]),
    "guest past the disk": _packed([(65536, 1, 1 << 62)]),
    "not base64 after all": "!!!!" * 18 + "!!!=",
}


@pytest.mark.parametrize("case", sorted(DAMAGED_RUNS))
def test_damaged_packed_runs_are_refused_when_used(case: str) -> None:
    """A run plans from the manifest without decoding its runs; verify, merge and copy
    use them, and then a damaged one is one RepositoryError naming manifest and disk."""
    text = _damaged(lambda d: d["disks"]["vda"].update(digests=DAMAGED_RUNS[case]))
    manifest = Manifest.from_json(text, "m")
    record = manifest.disks["vda"]
    assert record.virtual_size == 1 << 20
    with pytest.raises(RepositoryError, match="corrupt manifest m: disk vda: "):
        list(record.digests)
    with pytest.raises(RepositoryError, match="corrupt manifest m: disk vda: "):
        check_digests(manifest)


def test_packed_runs_round_trip_exactly() -> None:
    """Format 2 stores the runs as they were (every field, the full 64-bit range of a
    host offset up to 2**63-1), and a format 1 manifest reads as the same backup."""
    runs = (
        DigestRun(65536, 65536, 0, hashlib.sha256(b"a").hexdigest()),
        DigestRun((1 << 63) - 1, 1, (1 << 20) - 1, hashlib.sha256(b"b").hexdigest()),
        DigestRun(0, 4096, 8192, hashlib.sha256(b"c").hexdigest()),
    )
    manifest = sample()
    disk = manifest.disks["vda"]
    manifest.disks["vda"] = DiskRecord(**{**_fields(disk), "digests": runs})
    again = Manifest.from_json(manifest.to_json(), "m")
    assert len(again.disks["vda"].digests) == 3
    assert tuple(again.disks["vda"].digests) == runs
    assert json.loads(again.to_json())["disks"]["vda"]["digests"] == pack_runs(runs)
    old = Manifest.from_json(json.dumps(format1(manifest)), "m")
    assert old == again and tuple(old.disks["vda"].digests) == runs


def _fields(record: DiskRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_manifest_of_the_wrong_shape_is_a_corrupt_manifest(case: str) -> None:
    """Every wrong type, missing field, out-of-range number or unsafe name is one
    RepositoryError naming the manifest: never another exception."""
    with pytest.raises(RepositoryError, match="corrupt manifest m: "):
        Manifest.from_json(HOSTILE[case], "m")


def test_unknown_keys_are_ignored_and_old_defaults_apply() -> None:
    data = json.loads(sample().to_json())
    data["future"] = {"anything": [1, 2]}
    for key in ("compressed", "copy_seconds"):
        del data["disks"]["vda"][key]
    loaded = Manifest.from_json(json.dumps(data), "m")
    assert loaded.disks["vda"].copy_seconds == 0.0 and not loaded.disks["vda"].compressed


def test_source_round_trips_and_old_manifests_are_online() -> None:
    offline = Manifest.from_json(
        json.dumps({**json.loads(sample().to_json()), "source": "offline"}), "m"
    )
    assert offline.source == "offline"
    assert json.loads(offline.to_json())["source"] == "offline"
    old = json.loads(sample().to_json())
    del old["source"]
    assert Manifest.from_json(json.dumps(old), "m").source == "online"

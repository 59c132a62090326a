"""Manifest round trip, the digest algorithm of each disk, and the manifests of the
earlier sha256 form."""

from __future__ import annotations

import hashlib
import json

import pytest

from backupd.digests import ALGORITHM, hexdigest
from backupd.errors import RepositoryError
from backupd.manifest import DigestRun, DiskRecord, Manifest


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
    data = json.loads(sample().to_json())
    data["disks"]["vda"]["digests"].append(row)
    with pytest.raises(RepositoryError, match="corrupt manifest m"):
        Manifest.from_json(json.dumps(data), "m")

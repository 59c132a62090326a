"""Encrypted backups in a bucket (real Swift with s3api, real qemu): the images are
uploaded already encrypted (no plaintext in any object), every point restores from the
bucket byte-identically, verify checks the keyed digests through ranged reads, prune
rewrites the kept backups encrypted with the same key, ``copy`` into a local folder
checks the digests in transit and gives files stock qemu-img opens with the key file,
and a wrong key stops with exit 2 and nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from backupd.objectstore import ObjectStore
from integration.conftest import backupd
from integration.harness.chain import first_difference, image_info
from integration.harness.vm import QemuVM
from integration.test_encryption import make_key, qemu_read
from integration.test_s3_repository import PREFIX, ids, make_points, ok, restore_raw

pytestmark = [pytest.mark.s3, pytest.mark.slow]

#: make_points writes 6 MiB of 0x11, then 0x40.. and 0x60.. patterns
PATTERNS = (0x11, 0x40, 0x41, 0x60, 0x61)


async def image_objects(store: ObjectStore) -> dict[str, bytes]:
    found = {}
    async for info in store.list_objects(""):
        if info.key.endswith(".qcow2"):
            found[info.key] = await store.get(info.key)
    return found


def assert_ciphertext(images: dict[str, bytes]) -> None:
    assert images
    for key, data in images.items():
        for pattern in PATTERNS:
            assert bytes([pattern]) * 32 not in data, (key, hex(pattern))


async def test_encrypted_chain_in_a_bucket(
    vm: QemuVM, s3_config: Callable[..., Path], bucket: ObjectStore, tmp_path: Path
) -> None:
    key = make_key(tmp_path)
    encryption = {"key_file": str(key), "iter_time": 0.05}
    config = s3_config(encryption=encryption, vm_settings={"keep_last": 2})
    points = await make_points(vm, config, rounds=3, seed=7)
    backups = sorted(points)
    assert ids(config) == backups
    assert_ciphertext(await image_objects(bucket))
    for backup in backups:
        manifest = json.loads(await bucket.get(f"{PREFIX}/guest1/{backup}/manifest.json"))
        record = manifest["disks"]["vda"]
        assert record["encrypted"] is True and record["digest_algorithm"] == "blake3-keyed"
        assert (
            first_difference(restore_raw(config, backup, tmp_path / "o.raw"), points[backup])
            is None
        )
    verified = ok(config, "verify", "--vm", "guest1", "--all")
    assert verified.stderr.count(": ok (") == 3, verified.stderr
    # a wrong key: exit 2, one line, nothing written
    wrong = make_key(tmp_path, "wrong.key")
    wrong_config = s3_config(name="wrong.yaml", encryption={"key_file": str(wrong)})
    out = tmp_path / "wrong.raw"
    refused = backupd(wrong_config, "restore", "--vm", "guest1", "--disk", "vda",
                      "--output", str(out))  # fmt: skip
    assert refused.returncode == 2 and "key" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()
    # prune rewrites the kept backups: still encrypted, same key, same points
    pruned = ok(config, "prune", "--vm", "guest1")
    assert f"{backups[0]}  merge into {backups[1]}" in pruned.stdout, pruned.stdout
    assert ids(config) == backups[1:]
    assert_ciphertext(await image_objects(bucket))
    for backup in backups[1:]:
        assert (
            first_difference(restore_raw(config, backup, tmp_path / "o.raw"), points[backup])
            is None
        )
    assert ok(config, "verify", "--vm", "guest1", "--all").stderr.count(": ok (") == 2
    # copied into a folder (digests checked in transit): stock qemu-img opens it with the key
    local = tmp_path / "downloaded"
    copied = ok(config, "copy", "--vm", "guest1", "--to", str(local))
    assert "copied=2" in copied.stderr, copied.stderr
    newest = local / "guest1" / backups[-1] / "vda.qcow2"
    info = image_info(newest)
    assert info["encrypted"] is True and info["backing-filename"] == f"../{backups[1]}/vda.qcow2"
    assert first_difference(qemu_read(newest, key, tmp_path), points[backups[-1]]) is None
    # without the key, copy refuses the encrypted backups (nothing copied)
    plain = s3_config(name="plain.yaml")
    keyless = backupd(plain, "copy", "--vm", "guest1", "--to", str(tmp_path / "keyless"))
    assert keyless.returncode == 2, keyless.stderr
    assert "encrypted" in keyless.stderr and "Traceback" not in keyless.stderr
    assert not list((tmp_path / "keyless").glob("guest1/2*"))

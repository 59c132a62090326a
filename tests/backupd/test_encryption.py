"""Encryption without qemu: the LUKS header (made, checked, unlocked), AES-XTS-plain64
against the library's own per-sector XTS, key files, settings, and the gate."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from backupd.config import parse_config
from backupd.errors import ConfigError, EncryptionKeyError, UsageError
from backupd.keys import Encryption, keygen, load_key
from backupd.qcow2 import Qcow2Writer, luks
from backupd.qcow2.encryption import ImageKey, KeySpec, WrongKey, unlock_file
from backupd.qcow2.inspector import ImageRefused, inspect_image
from backupd.qcow2.xts import SectorCipher


@pytest.mark.parametrize("key_bytes", [32, 64])
def test_xts_matches_one_library_call_per_sector(key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    plain = os.urandom(512 * 19)
    data = bytearray(plain)
    SectorCipher(key).encrypt(data, 512 * 7777)
    expected = b"".join(
        Cipher(algorithms.AES(key), modes.XTS((7777 + i).to_bytes(16, "little")))
        .encryptor()
        .update(plain[i * 512 : (i + 1) * 512])
        for i in range(19)
    )
    assert bytes(data) == expected
    SectorCipher(key).decrypt(data, 512 * 7777)
    assert bytes(data) == plain
    with pytest.raises(ValueError, match="whole sectors"):
        SectorCipher(key).encrypt(bytearray(100), 0)


def test_luks_region_unlocks_with_its_passphrase_only() -> None:
    master = os.urandom(64)
    region = luks.create(b"correct horse", master, iterations=2000)
    assert len(region) == luks.region_sectors(64) * 512 == 2068480
    header = luks.parse(region[: luks.HEADER_BYTES], len(region))
    assert [s.active for s in header.slots] == [True] + [False] * 7
    assert [s.offset for s in header.slots] == [8 + 504 * i for i in range(8)]

    def read(offset: int, length: int) -> bytes:
        return region[offset : offset + length]

    assert luks.unlock(header, read, b"correct horse") == master
    assert luks.unlock(header, read, b"correct horsf") is None


def test_af_split_merges_back() -> None:
    key = os.urandom(32)
    spread = luks.af_split("sha256", key, stripes=50)
    assert len(spread) == 32 * 50
    assert luks.af_merge("sha256", spread, 32, stripes=50) == key


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"LUKX", "not a LUKS version 1"),
        (8, b"twofish\0", "not aes"),
        (72, b"md5\0\0\0", "hash"),
        (164, struct.pack(">I", 1 << 30), "iterations"),
        (208 + 48 * 3, struct.pack(">I", 0x12345678), "slot 3 is damaged"),
    ],
)
def test_luks_headers_backupd_would_not_write_are_refused(
    offset: int, value: bytes, message: str
) -> None:
    region = bytearray(luks.create(b"pass", os.urandom(64), iterations=1000))
    region[offset : offset + len(value)] = value
    with pytest.raises(luks.LuksError, match=message):
        luks.parse(bytes(region[: luks.HEADER_BYTES]), len(region))


def _encrypted_image(path: Path, passphrase: bytes) -> ImageKey:
    key, region = ImageKey.new(KeySpec(passphrase, iterations=1000))
    writer = Qcow2Writer(path, 4 << 20, luks_region=region).open()
    data = bytearray(b"\x5a" * 65536)
    host = writer.allocate(65536, len(data))
    key.cipher.encrypt(data, host)
    os.pwrite(writer.fd, data, host)
    writer.finish()
    return key


def test_gate_admits_luks_only_when_asked_and_the_file_unlocks(tmp_path: Path) -> None:
    image = tmp_path / "e.qcow2"
    key = _encrypted_image(image, b"pass")
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(ImageRefused, match="encryption is not enabled"):
            inspect_image(fd)
        facts = inspect_image(fd, allow_encryption=True)
        assert facts.encrypted and facts.data_clusters == 1
        assert unlock_file(fd, b"pass", "e").master_key == key.master_key
        with pytest.raises(WrongKey):
            unlock_file(fd, b"other", "e")
    finally:
        os.close(fd)
    assert b"\x5a" * 32 not in image.read_bytes()


def test_gate_refuses_a_luks_region_outside_the_file(tmp_path: Path) -> None:
    image = tmp_path / "e.qcow2"
    _encrypted_image(image, b"pass")
    raw = bytearray(image.read_bytes())
    at = raw.index(struct.pack(">II", 0x0537BE77, 16)) + 8
    raw[at : at + 8] = struct.pack(">Q", len(raw))
    image.write_bytes(raw)
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(ImageRefused, match="lies outside the file"):
            inspect_image(fd, allow_encryption=True)
    finally:
        os.close(fd)


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keygen(path)
    assert path.stat().st_mode & 0o777 == 0o400
    assert len(bytes.fromhex(path.read_text())) == 32
    with pytest.raises(UsageError, match="never overwrites"):
        keygen(path)
    with load_key(Encryption(path)) as key:
        assert key.passphrase == path.read_bytes()
        assert key.qemu_object()["file"] == f"/dev/fd/{key.fd}"
    path.chmod(0o640)
    with pytest.raises(EncryptionKeyError, match="mode 0640: it must be 0600 or 0400"):
        load_key(Encryption(path))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\0" * 20)
    binary.chmod(0o600)
    with pytest.raises(EncryptionKeyError, match="not text"):
        load_key(Encryption(binary))
    with pytest.raises(EncryptionKeyError, match="does not exist"):
        load_key(Encryption(tmp_path / "missing"))


def test_encryption_settings(tmp_path: Path) -> None:
    def parse(top: object, vm: dict[str, object]) -> object:
        data = {"repository": "/r", "encryption": top, "vms": {"g": {"qmp": "/q", **vm}}}
        return parse_config(data, tmp_path / "c.yaml").vm("g").encryption

    got = parse({"key_file": "k"}, {})
    assert got == Encryption(tmp_path / "k", "aes-256-xts-plain64", "pbkdf2", "sha256", 0.2)
    assert parse({"key_file": "k"}, {"encryption": False}) is None
    assert parse(None, {"encryption": {"key_file": "/v", "cipher": "aes-128-xts-plain64"}}) == (
        Encryption(Path("/v"), "aes-128-xts-plain64")
    )
    for bad, message in (
        ({"key_file": "k", "kdf": "argon2"}, "argon2 is LUKS2"),
        ({"key_file": "k", "cipher": "aes-cbc-essiv"}, "cipher must be one of"),
        ({"key_file": "k", "iter_time": 60}, "iter_time"),
        ({"key_file": "k", "keyfile": "x"}, "unknown configuration key"),
        ({}, "key_file is required"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse(bad, {})
    with pytest.raises(ConfigError, match="compress and encryption"):
        parse({"key_file": "k"}, {"compress": True})

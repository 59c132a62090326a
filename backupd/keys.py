"""Encryption keys: the ``encryption:`` settings, the key file, and the key handed to qemu.

The key file holds the passphrase of the LUKS key slot of every file backupd writes
for a VM (each file has a master key of its own, wrapped by that passphrase: see
:mod:`backupd.qcow2.encryption`).  It is the only way back to the data.

What a key file must be, checked on every use (else one line, exit 2):

- a regular file owned by the user backupd runs as (root), mode 0600 or 0400;
- UTF-8 text without NUL bytes, 1 byte to 64 KiB: qemu reads a LUKS passphrase as
  UTF-8 and stops at a NUL.  Every byte counts, a final newline too (qemu reads the
  file whole).  ``backupd keygen`` writes 32 random bytes as 64 hex digits, no newline.

qemu gets the key as a ``secret`` object reading the file through the descriptor
backupd opened and checked (``file=/dev/fd/N``, inherited by the child): no secret in
any command line or environment, no copy of it on disk, and the file qemu reads is the
one that was checked, whatever happens to its path meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from backupd.errors import ConfigError, EncryptionKeyError, UsageError
from backupd.qcow2 import luks
from backupd.repofiles import fsync_dir

if TYPE_CHECKING:  # the ciphers (numpy, cryptography) are imported when a key is used
    from backupd.qcow2.encryption import ImageKey, KeySpec
    from backupd.qcow2.inspector import ImageReader

#: ciphers of qemu 7.2's LUKS (version 1) that backupd writes, and their key bytes
CIPHERS: Final = luks.CIPHERS
KDF_HASHES: Final = luks.HASHES
MAX_KEY_BYTES: Final = 64 << 10
#: the id of the key's ``secret`` object in every qemu that opens encrypted files
SECRET_ID: Final = "s0"
DEFAULT_CIPHER: Final = "aes-256-xts-plain64"
#: PBKDF2 seconds of a new key slot: qemu opens a file in ~0.1-0.2 s with it here
DEFAULT_ITER_TIME: Final = 0.2
_KEYS = {"key_file", "cipher", "kdf", "kdf_hash", "iter_time"}


@dataclass(frozen=True, slots=True)
class Encryption:
    """``encryption:``: backups as LUKS-encrypted qcow2 files.  ``iter_time`` is the
    PBKDF2 time (seconds) a new key slot is tuned to: what opening one file costs."""

    key_file: Path
    cipher: str = DEFAULT_CIPHER
    kdf: str = "pbkdf2"
    kdf_hash: str = "sha256"
    iter_time: float = DEFAULT_ITER_TIME


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _iter_time(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 10:
        raise ConfigError(f"{name} must be a number of seconds from 0 to 10, not {value!r}")
    return float(value)


def parse_encryption(
    data: Mapping[str, Any],
    where: str,
    inherited: Encryption | None,
    beside_config: Callable[[str], Path],
) -> Encryption | None:
    """``encryption:`` of the top level or of a VM (``where``: ``vms.NAME.``), which
    replaces the top level's; ``encryption: false`` turns it off for one VM."""
    if "encryption" not in data:
        return inherited
    value = data["encryption"]
    if value is False or value is None:
        return None
    name = f"{where}encryption"
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping with key_file (or false), not {value!r}")
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown configuration key {name}.{unknown[0]!r}")
    key_file = value.get("key_file")
    if not isinstance(key_file, str) or not key_file or "\0" in key_file:
        raise ConfigError(f"{name}.key_file is required: a path (make one: backupd keygen PATH)")
    if value.get("kdf") == "argon2":
        raise ConfigError(
            f"{name}.kdf: qemu's LUKS (version 1) has only pbkdf2; argon2 is LUKS2's, "
            "which qemu does not open"
        )
    return Encryption(
        key_file=beside_config(key_file),
        cipher=_choice(value.get("cipher", DEFAULT_CIPHER), f"{name}.cipher", tuple(CIPHERS)),
        kdf=_choice(value.get("kdf", "pbkdf2"), f"{name}.kdf", ("pbkdf2",)),
        kdf_hash=_choice(value.get("kdf_hash", "sha256"), f"{name}.kdf_hash", KDF_HASHES),
        iter_time=_iter_time(value.get("iter_time", DEFAULT_ITER_TIME), f"{name}.iter_time"),
    )


class Key:
    """A checked key file, open: the passphrase, and the descriptor qemu reads it from.
    A context manager (closing the descriptor)."""

    def __init__(self, settings: Encryption, passphrase: bytes, fd: int) -> None:
        self.settings = settings
        self.passphrase = passphrase
        self.fd = fd

    def spec(self) -> KeySpec:
        """How new files are encrypted (PBKDF2 iterations measured for ``iter_time``)."""
        from backupd.qcow2.encryption import KeySpec

        s = self.settings
        key_bytes = CIPHERS[s.cipher]
        iterations = luks.iterations_for(s.kdf_hash, key_bytes, s.iter_time)
        return KeySpec(self.passphrase, key_bytes, s.kdf_hash, iterations)

    def open_image(self, image: int | ImageReader, where: str) -> ImageKey:
        """The master key of the encrypted image ``image`` (a descriptor, or an image in
        a bucket); EncryptionKeyError naming the key file when it opens no key slot."""
        from backupd.qcow2.encryption import WrongKey, unlock_file

        try:
            return unlock_file(image, self.passphrase, where)
        except WrongKey as exc:
            raise EncryptionKeyError(f"{exc}: {self.settings.key_file}") from None

    @property
    def qemu_file(self) -> str:
        return f"/dev/fd/{self.fd}"

    def qemu_object(self, ident: str = SECRET_ID) -> dict[str, str]:
        """The ``secret`` object (``--object`` as JSON) that reads the key."""
        return {"qom-type": "secret", "id": ident, "file": self.qemu_file}

    def qemu_object_arg(self, ident: str = SECRET_ID) -> str:
        """The same in qemu-img's ``--object`` syntax (no secret in it: a descriptor)."""
        return f"secret,id={ident},file={self.qemu_file}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Key:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(fd: int, path: Path) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise EncryptionKeyError(f"key file {path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise EncryptionKeyError(
            f"key file {path} is owned by uid {info.st_uid}: it must be owned by root "
            f"(uid {os.geteuid()}, the user backupd runs as)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode not in (0o600, 0o400):
        raise EncryptionKeyError(
            f"key file {path} has mode {mode:04o}: it must be 0600 or 0400 (chmod 0400 {path})"
        )
    data = os.pread(fd, MAX_KEY_BYTES + 1, 0)
    if not data or len(data) > MAX_KEY_BYTES:
        raise EncryptionKeyError(f"key file {path} must hold 1 byte to 64 KiB, not {len(data)}")
    try:
        data.decode("utf-8")
        valid = b"\0" not in data
    except UnicodeDecodeError:
        valid = False
    if not valid:
        raise EncryptionKeyError(
            f"key file {path} is not text: qemu takes a LUKS passphrase as UTF-8 text "
            "without NUL bytes (make a key with: backupd keygen PATH)"
        )
    return data


def load_key(settings: Encryption) -> Key:
    """Open and check the key file (EncryptionKeyError, exit 2, saying what is wrong)."""
    path = settings.key_file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise EncryptionKeyError(
            f"key file {path} does not exist (make one with: backupd keygen {path})"
        ) from None
    except OSError as exc:
        raise EncryptionKeyError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        return Key(settings, _checked(fd, path), fd)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def vm_key(settings: Encryption | None) -> Iterator[Key | None]:
    """The loaded key of a VM's settings for the block (None when not encrypted)."""
    if settings is None:
        yield None
        return
    with load_key(settings) as key:
        yield key


def keygen(path: Path) -> None:
    """A new key file: 32 random bytes as 64 hex digits, mode 0400, never overwriting."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    except FileExistsError:
        raise UsageError(f"{path} exists: backupd keygen never overwrites a key") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o400)  # whatever the umask
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)

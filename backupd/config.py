"""The configuration file: YAML in, validated immutable objects out.

Every key is known: an unknown or misspelled key is an error that names it
(``vms.guest1.dsiks``).  Top-level settings are defaults that a VM may override.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from backupd import names
from backupd.errors import ConfigError
from backupd.keys import Encryption, parse_encryption
from backupd.objectstore.settings import S3Settings
from backupd.storage.location import Location, S3Location, parse_location
from nbdclient.constants import DEFAULT_REQUEST_SIZE

#: the scratch folder of a VM whose repository is in object storage (it must be local)
S3_SCRATCH_DIR = Path("/var/lib/backupd/scratch")


class Fleecing(StrEnum):
    """How qemu keeps the point-in-time view (``fleecing:``)."""

    AUTO = "auto"
    SNAPSHOT_ACCESS = "snapshot-access"
    BLOCKDEV_BACKUP = "blockdev-backup"


class ImageFormat(StrEnum):
    """The format of a disk image: of ``images:`` (never guessed: see ImageConfig), and
    of a restore's output."""

    QCOW2 = "qcow2"
    RAW = "raw"


def check_name(kind: str, name: str) -> str:
    """A VM or disk name of the configuration (the rules are :mod:`backupd.names`')."""
    return names.check_name(kind, name, ConfigError)


@dataclass(frozen=True, slots=True)
class Retention:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None

    @property
    def configured(self) -> bool:
        return any(
            v is not None
            for v in (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly)
        )


@dataclass(frozen=True, slots=True)
class Transfer:
    """How disks are read: NBD connections per disk, reads in flight, read size."""

    connections: int = 4
    requests: int = 16
    request_size: int = DEFAULT_REQUEST_SIZE
    compress: bool = False


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The image file of one disk, which backupd opens itself while the VM's qemu is
    not running.  Its format is what the configuration says (qcow2 unless told),
    never guessed from the file: a raw disk's guest can write a qcow2 header, with a
    backing file of its choice, into the first bytes of its disk."""

    disk: str
    path: Path
    format: ImageFormat = ImageFormat.QCOW2


@dataclass(frozen=True, slots=True)
class VMConfig:
    name: str
    qmp: str
    guest_agent: str | None = None
    disks: tuple[str, ...] | None = None
    max_chain: int = 14
    transfer: Transfer = field(default_factory=Transfer)
    retention: Retention = field(default_factory=Retention)
    timeout: float = 30.0
    #: how qemu keeps the point-in-time view
    fleecing: Fleecing = Fleecing.AUTO
    #: the longest the guest's file systems may stay frozen (freeze included), seconds
    freeze_timeout: float = 30.0
    #: fail a run whose file systems could not be frozen instead of going crash-consistent
    require_quiesce: bool = False
    #: the disks' image files, for backups while qemu is not running (offline)
    images: tuple[ImageConfig, ...] = ()
    #: encrypted backups (None: not encrypted)
    encryption: Encryption | None = None

    @property
    def qmp_address(self) -> str | tuple[str, int]:
        """A unix socket path, or (host, port) for ``host:port``."""
        if "/" not in self.qmp and re.fullmatch(r"[^:]+:\d+", self.qmp):
            host, port = self.qmp.rsplit(":", 1)
            return host, int(port)
        return self.qmp


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    #: a local folder, or a bucket and key prefix (``repository: s3://BUCKET/PREFIX``)
    repository: Location
    scratch_dir: Path
    runtime_dir: Path | None
    metrics_file: Path | None
    vms: Mapping[str, VMConfig]
    #: how to reach object storage (the ``s3:`` block; defaults when absent)
    s3: S3Settings = field(default_factory=S3Settings)

    def vm(self, name: str) -> VMConfig:
        try:
            return self.vms[name]
        except KeyError:
            known = ", ".join(sorted(self.vms)) or "none"
            raise ConfigError(f"unknown VM {name!r} (configured: {known})") from None


def _default(cls: type, name: str) -> Any:
    """The default a dataclass field declares (defaults are written once: there)."""
    found = next(f for f in fields(cls) if f.name == name)
    if found.default is not MISSING:
        return found.default
    assert found.default_factory is not MISSING
    return found.default_factory()


def _integer(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, not {value!r}")
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, not {value}")
        return value

    return parse


def _seconds(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    return value


def _request_size(value: Any, name: str) -> int:
    size = _size(value, name)
    if not 65536 <= size <= 32 << 20:
        raise ConfigError(f"{name} must be between 64K and 32M")
    return size


def _fleecing(value: Any, name: str) -> Fleecing:
    try:
        return Fleecing(value)
    except ValueError:
        choices = ", ".join(m.value for m in Fleecing)
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}") from None


#: Settings a VM inherits from the top level and may override: how each is read, and
#: its default (from the dataclass that holds it)
SETTINGS: dict[str, tuple[Callable[[Any, str], Any], Any]] = {
    "max_chain": (_integer(0), _default(VMConfig, "max_chain")),
    "compress": (_flag, _default(Transfer, "compress")),
    "connections": (_integer(1), _default(Transfer, "connections")),
    "requests": (_integer(1), _default(Transfer, "requests")),
    "request_size": (_request_size, _default(Transfer, "request_size")),
    "timeout": (_seconds, _default(VMConfig, "timeout")),
    "fleecing": (_fleecing, _default(VMConfig, "fleecing")),
    "freeze_timeout": (_seconds, _default(VMConfig, "freeze_timeout")),
    "require_quiesce": (_flag, _default(VMConfig, "require_quiesce")),
    "keep_last": (_integer(0), _default(Retention, "keep_last")),
    "keep_daily": (_integer(0), _default(Retention, "keep_daily")),
    "keep_weekly": (_integer(0), _default(Retention, "keep_weekly")),
    "keep_monthly": (_integer(0), _default(Retention, "keep_monthly")),
}
_SETTING_KEYS = set(SETTINGS)
_TOP_KEYS = {
    "repository", "scratch_dir", "runtime_dir", "metrics_file", "vms", "encryption", "s3"
} | _SETTING_KEYS  # fmt: skip
_VM_KEYS = {"qmp", "guest_agent", "disks", "images", "encryption"} | _SETTING_KEYS
_IMAGE_KEYS = {"path", "format"}


def _unknown(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            hint = ""
            close = [k for k in known if _similar(str(key), k)]
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            raise ConfigError(f"unknown configuration key {path!r}{hint}")


def _similar(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 2:
        return False
    return len(set(a) ^ set(b)) <= 2 and a[:1] == b[:1]


def _get(
    data: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    default: Any = None,
) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"{where}{key} must be a number, not {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        names = {
            "str": "a string",
            "int": "an integer",
            "bool": "true or false",
            "list": "a list",
            "dict": "a mapping",
        }.get(names, names)
        raise ConfigError(f"{where}{key} must be {names}, not {value!r}")
    return value


def _size(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", value, re.IGNORECASE)
        if match:
            scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
            return int(match.group(1)) * scale
    raise ConfigError(f"{name} must be a size like 4M, not {value!r}")


def _settings(data: Mapping[str, Any], where: str, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the settings ``data`` gives, each read and checked."""
    out = dict(base)
    for key, (parse, _) in SETTINGS.items():
        if data.get(key) is not None:
            out[key] = parse(data[key], f"{where}{key}")
    return out


def _image(disk: str, value: Any, where: str, beside_config: Callable[[str], Path]) -> ImageConfig:
    """One entry of ``images:``: ``vda: PATH`` or ``vda: {path: PATH, format: raw}``."""
    fmt = ImageFormat.QCOW2
    if isinstance(value, dict):
        _unknown(f"{where}{disk}", value, _IMAGE_KEYS)
        raw = _get(value, "format", str, f"{where}{disk}.", "qcow2")
        try:
            fmt = ImageFormat(raw)
        except ValueError:
            choices = ", ".join(f.value for f in ImageFormat)
            raise ConfigError(
                f"{where}{disk}.format must be one of {choices}, not {raw!r}"
            ) from None
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{where}{disk} must be the path of the disk's image (or a mapping with "
            f"'path' and 'format'), not {value!r}"
        )
    if "\0" in value:
        raise ConfigError(f"{where}{disk}: the path holds a NUL character")
    return ImageConfig(disk, beside_config(value), fmt)


def _images(
    data: Mapping[str, Any],
    vm: str,
    disks: list[str] | None,
    beside_config: Callable[[str], Path],
) -> tuple[ImageConfig, ...]:
    """``vms.<vm>.images``: disk name -> image file, checked."""
    where = f"vms.{vm}.images"
    entries = _get(data, "images", dict, f"vms.{vm}.", {})
    if "images" in data and not entries:
        raise ConfigError(f"{where} must name at least one disk's image")
    images = tuple(
        _image(check_name("disk", str(disk)), value, f"{where}.", beside_config)
        for disk, value in entries.items()
    )
    paths = [image.path for image in images]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"{where} names one image file for two disks")
    missing = [d for d in disks or () if d not in entries] if images else []
    if missing:
        raise ConfigError(
            f"vms.{vm}.disks names {', '.join(missing)}, which {where} does not have "
            "(an offline backup needs the image of every disk it backs up)"
        )
    return images


def load_config(path: Path) -> Config:
    """Read and validate the configuration file (ConfigError with one clear line)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist (use -c FILE)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_config(data, path)


def parse_config(data: Any, path: Path) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys")
    _unknown("", data, _TOP_KEYS)
    repo = _get(data, "repository", str, "")
    if not repo:
        raise ConfigError(f"{path}: 'repository' is required")
    repository = parse_location(repo, path.parent)
    s3 = S3Settings.from_mapping(data["s3"]) if data.get("s3") is not None else S3Settings()
    scratch = _get(data, "scratch_dir", str, "")
    runtime = _get(data, "runtime_dir", str, "")
    metrics = _get(data, "metrics_file", str, "")
    defaults = _settings(data, "", {key: default for key, (_, default) in SETTINGS.items()})
    vms_data = _get(data, "vms", dict, "", {})

    def beside_config(value: str) -> Path:
        """A path from the file; a relative one is taken from the file's folder."""
        return (path.parent / value).resolve() if not Path(value).is_absolute() else Path(value)

    encryption = parse_encryption(data, "", None, beside_config)

    vms: dict[str, VMConfig] = {}
    for name, vm_data in vms_data.items():
        check_name("VM", str(name))
        where = f"vms.{name}."
        if not isinstance(vm_data, dict):
            raise ConfigError(f"vms.{name} must be a mapping with at least 'qmp'")
        _unknown(f"vms.{name}", vm_data, _VM_KEYS)
        qmp = _get(vm_data, "qmp", str, where)
        if not qmp:
            raise ConfigError(f"vms.{name}.qmp is required (the VM's QMP socket)")
        disks = _get(vm_data, "disks", list, where)
        if disks is not None:
            if not disks:
                raise ConfigError(f"vms.{name}.disks must not be empty")
            for disk in disks:
                check_name("disk", disk)
            if len(set(disks)) != len(disks):
                raise ConfigError(f"vms.{name}.disks names a disk twice")
        s = _settings(vm_data, where, defaults)
        vm_encryption = parse_encryption(vm_data, where, encryption, beside_config)
        if vm_encryption is not None and s["compress"]:
            raise ConfigError(
                f"vms.{name}: compress and encryption do not go together (qemu stores "
                "compressed clusters of an encrypted image unencrypted)"
            )
        vms[str(name)] = VMConfig(
            name=str(name),
            qmp=qmp,
            guest_agent=_get(vm_data, "guest_agent", str, where),
            disks=tuple(disks) if disks is not None else None,
            max_chain=s["max_chain"],
            transfer=Transfer(s["connections"], s["requests"], s["request_size"], s["compress"]),
            retention=Retention(
                s.get("keep_last"), s.get("keep_daily"), s.get("keep_weekly"), s.get("keep_monthly")
            ),
            timeout=s["timeout"],
            fleecing=s["fleecing"],
            freeze_timeout=s["freeze_timeout"],
            require_quiesce=s["require_quiesce"],
            images=_images(vm_data, str(name), disks, beside_config),
            encryption=vm_encryption,
        )

    if scratch:
        scratch_dir = beside_config(scratch)
    elif isinstance(repository, S3Location):
        scratch_dir = S3_SCRATCH_DIR
    else:
        scratch_dir = repository / ".scratch"
    return Config(
        path=path,
        repository=repository,
        scratch_dir=scratch_dir,
        runtime_dir=beside_config(runtime) if runtime else None,
        metrics_file=beside_config(metrics) if metrics else None,
        vms=vms,
        s3=s3,
    )

"""How to reach an S3-compatible object store: the ``s3:`` settings, resolved once.

Credentials are either both given (``access_key_id`` and ``secret_access_key``) or
both left out; then the standard AWS chain applies (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, the files named by
``AWS_SHARED_CREDENTIALS_FILE`` / ``AWS_CONFIG_FILE`` or ``~/.aws/credentials`` and
``~/.aws/config``, then a container or instance role).  The region likewise falls back
to ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the config file, and then to ``us-east-1``.

The secret never leaves this object by ``repr``/``str`` (nor by a dataclass dump of a
containing object): it is shown as ``'***'``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from backupd.errors import ConfigError

ADDRESSING_STYLES = ("path", "virtual")
HIDDEN = "***"


@dataclass(frozen=True, slots=True, repr=False)
class S3Settings:
    endpoint_url: str | None = None  # None: AWS S3 itself
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    #: "path" (``https://host/bucket/key``) works with every S3 server; "virtual"
    #: (``https://bucket.host/key``) is what AWS prefers
    addressing_style: str = "path"
    ca_bundle: Path | None = None
    verify_tls: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: tries per request, the first included, on 5xx, throttling and connection resets
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            given, missing = (
                ("access_key_id", "secret_access_key")
                if self.secret_access_key is None
                else ("secret_access_key", "access_key_id")
            )
            raise ConfigError(f"s3.{given} is set but s3.{missing} is not: give both or neither")
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ConfigError(
                f"s3.addressing_style must be 'path' or 'virtual', not {self.addressing_style!r}"
            )
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"s3.endpoint_url must start with http:// or https://, not {self.endpoint_url!r}"
            )
        if self.max_attempts < 1:
            raise ConfigError(f"s3.max_attempts must be at least 1, not {self.max_attempts}")

    @property
    def secure(self) -> bool:
        """Whether requests travel over TLS (AWS itself always does)."""
        return self.endpoint_url is None or self.endpoint_url.startswith("https://")

    @property
    def verify(self) -> str | bool:
        """What botocore takes as ``verify``: a CA bundle path, or on/off."""
        if not self.verify_tls:
            return False
        return str(self.ca_bundle) if self.ca_bundle is not None else True

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("secret_access_key", "session_token") and value is not None:
                value = HIDDEN
            shown.append(f"{f.name}={value!r}")
        return f"S3Settings({', '.join(shown)})"

    __str__ = __repr__

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "s3") -> S3Settings:
        """The settings of a configuration file's ``s3:`` block; an unknown key, or a
        value of the wrong type, is a :class:`ConfigError` that names it."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping, not {type(data).__name__}")
        kinds: dict[str, tuple[type, ...]] = {
            "endpoint_url": (str,),
            "region": (str,),
            "access_key_id": (str,),
            "secret_access_key": (str,),
            "session_token": (str,),
            "addressing_style": (str,),
            "ca_bundle": (str,),
            "verify_tls": (bool,),
            "connect_timeout": (int, float),
            "read_timeout": (int, float),
            "max_attempts": (int,),
        }
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in kinds:
                close = difflib.get_close_matches(str(key), kinds, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown configuration key '{where}.{key}'{hint}")
            if value is None:
                continue
            numeric = kinds[key][0] is not bool
            if not isinstance(value, kinds[key]) or (numeric and isinstance(value, bool)):
                # never echo a value: it may be a secret
                expected = " or ".join(k.__name__ for k in kinds[key])
                raise ConfigError(f"{where}.{key} must be of type {expected}")
            values[key] = Path(str(value)) if key == "ca_bundle" else value
        return cls(**values)

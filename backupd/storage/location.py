"""A repository's location as the configuration (or ``copy --to``) names it: a local
folder, or ``s3://BUCKET/PREFIX`` (a bucket of an S3-compatible store and a key prefix
in it, possibly empty).

Object keys are ``PREFIX/<vm>/<backup-id>/<file>``: the prefix is split into components,
each a plain name (no empty component, no ``.`` or ``..``, no control character), so a
key built from it never means anything but the layout's place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backupd.errors import ConfigError

SCHEME = "s3://"
#: bucket names as S3 allows them (older and non-AWS servers also allow upper case and _)
BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    #: key prefix without leading or trailing ``/`` ("" for the bucket's root)
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` (``vm``, ``backup``, ``file``) below the prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def folder(self, *parts: str) -> str:
        """The key prefix of a "folder" (ends with ``/``)."""
        return self.key(*parts) + "/" if (self.prefix or parts) else ""

    def __str__(self) -> str:
        return self.url


Location = Path | S3Location


def is_s3_url(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_s3_url(text: str, what: str = "repository") -> S3Location:
    """``s3://BUCKET[/PREFIX]`` (ConfigError naming ``what`` when malformed)."""
    if not is_s3_url(text):
        raise ConfigError(f"{what} {text!r} is not an s3:// URL")
    bucket, _, prefix = text[len(SCHEME) :].partition("/")
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"{what} {text!r}: {bucket!r} is not a bucket name (letters, digits, '.', '_', "
            "'-', 2 to 255 characters)"
        )
    prefix = prefix.strip("/")
    if prefix:
        for part in prefix.split("/"):
            if part in ("", ".", "..") or _CONTROL.search(part) or len(part) > 255:
                raise ConfigError(
                    f"{what} {text!r}: the key prefix has an empty, '.', '..' or "
                    "unprintable component"
                )
    return S3Location(bucket, prefix)


def parse_location(text: str, base: Path, what: str = "repository") -> Location:
    """An ``s3://`` URL, or a path (a relative one taken from ``base``)."""
    if is_s3_url(text):
        return parse_s3_url(text, what)
    if "\0" in text:
        raise ConfigError(f"{what}: the path holds a NUL character")
    path = Path(text)
    return path if path.is_absolute() else (base / path).resolve()

"""How the merge's ``qemu-img`` opens repository files: plain by name, or, for an
encrypted VM, with the key's ``secret`` object and ``encrypt.key-secret`` for the file
and for every backing file below it (each file of a chain has its own LUKS header,
opened with the same key).

qemu-img 7.2 cannot name an encrypted base for ``commit -b`` (an image opened with
options has a ``json:`` name that the base's relative name is never resolved against),
so an encrypted fold commits one level at a time, top down, each into its own backing
file; and ``rebase`` names its new backing file as ``json:`` with the key, a name
:func:`backupd.merge.fold.canonical_header` then replaces with the relative one.
"""

from __future__ import annotations

import json

from backupd.keys import SECRET_ID, Key


def secret_args(key: Key | None) -> list[str]:
    return [] if key is None else ["--object", key.qemu_object_arg(SECRET_ID)]


def fds(key: Key | None) -> tuple[int, ...]:
    return () if key is None else (key.fd,)


def image_args(path: str, below: int, key: Key | None) -> list[str]:
    """qemu-img's arguments naming the image ``path`` with ``below`` backing files."""
    if key is None:
        return ["-f", "qcow2", path]
    secrets = ",".join(
        f"{'backing.' * level}encrypt.key-secret={SECRET_ID}" for level in range(below + 1)
    )
    return ["--image-opts", f"driver=qcow2,file.filename={path},{secrets}"]


def backing_spec(path: str, below: int) -> str:
    """A new backing file for ``rebase -b``, opened with the key (``json:``)."""
    node: dict[str, object] = {"encrypt": {"format": "luks", "key-secret": SECRET_ID}}
    top = node
    for _ in range(below):
        lower: dict[str, object] = {"encrypt": {"format": "luks", "key-secret": SECRET_ID}}
        node["backing"] = lower
        node = lower
    top.update({"driver": "qcow2", "file": {"driver": "file", "filename": path}})
    return "json:" + json.dumps(top, sort_keys=True)

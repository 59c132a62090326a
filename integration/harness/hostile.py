"""Hostile repositories: one VM folder per case, each a real chain (a full and an
incremental written by backupd's writer) damaged the way someone with write access to
the repository could: crafted manifests, symlinks and special files in the layout, and
crafted qcow2 headers and tables.  ``outside`` holds what must never be read: a canary
file and a pristine copy of the chain (what a symlink or a traversal would reach)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.qcow2 import layout
from integration.harness.digest_runs import runs, set_runs
from tests.backupd.crafted import (
    FULL,
    INCREMENTAL,
    rewrite_cluster0,
    set_entry,
)

COMMANDS = ("list", "status", "verify", "restore", "serve", "prune")
#: the commands that read images (prune merges: with keep_last 1 it folds the full into
#: the incremental, so it hands both to qemu-img and must refuse what the gate refuses)
READ_IMAGES = frozenset({"verify", "restore", "serve", "prune"})
EVERYTHING_BUT_LIST = frozenset({"verify", "restore", "serve", "prune"})
DATA_FILE_EXT = 0x44415441
FEATURE_TABLE_EXT = 0x6803F857
CANARY = b"CANARY-outside-the-repository\n" * 4096

Damage = Callable[[Path, Path], None]


@dataclass(frozen=True)
class Case:
    name: str  # also the VM's name
    group: str  # manifests, paths, qcow2 headers, control
    damage: Damage  # (the VM's folder, the outside folder)
    refuse: frozenset[str]  # commands that must not succeed
    point: str | None = INCREMENTAL  # what a successful restore holds (None: no backup)
    tainted: tuple[str, ...] = ()  # files of the VM folder no qemu may open
    damaged: tuple[str, ...] = ()  # the backups ``list`` reports as damaged


def canary(outside: Path) -> Path:
    return outside / "canary.raw"


def own_canary(outside: Path, vm: Path) -> Path:
    """A canary for one case (a case that plants a symlink to it is judged by it alone)."""
    path = outside / f"{vm.name}.canary"
    if not path.exists():
        path.write_bytes(CANARY)
    return path


def make_outside(outside: Path, pristine: Path) -> None:
    outside.mkdir(parents=True)
    canary(outside).write_bytes(CANARY)
    shutil.copytree(pristine, outside / "copy")


def copy_chain(pristine: Path, vm: Path) -> None:
    """The pristine chain as the backups of the VM named like ``vm``'s folder."""
    shutil.copytree(pristine, vm)
    for backup in (FULL, INCREMENTAL):
        path = vm / backup / "manifest.json"
        path.write_text(path.read_text().replace(f'"vm": "{pristine.name}"', f'"vm": "{vm.name}"'))


# ---- manifests ----------------------------------------------------------------------


def manifest(backup: str, change: Callable[[dict[str, Any]], object]) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        path = vm / backup / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return damage


def manifest_text(text: str) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        (vm / INCREMENTAL / "manifest.json").write_text(text)

    return damage


def run0(data: dict[str, Any], index: int, value: object, packed: bool = False) -> None:
    """Set one field of vda's first digest run: in the JSON lists of format 1 (checked
    when the manifest is read), or ``packed`` (format 2: checked when runs are used)."""
    rows = runs(data["disks"]["vda"])
    rows[0][index] = value
    set_runs(data, "vda", rows, packed)


def cycle(vm: Path, outside: Path) -> None:
    manifest(FULL, lambda d: d.update(kind="incremental", parent=INCREMENTAL))(vm, outside)


def traversal(vm: Path, outside: Path) -> None:
    target = f"../../../outside/copy/{INCREMENTAL}/vda.qcow2"
    manifest(INCREMENTAL, lambda d: d["disks"]["vda"].update(file=target))(vm, outside)


def rename_disk(name: str) -> Damage:
    def change(data: dict[str, Any]) -> None:
        record = data["disks"].pop("vda")
        record.update(name=name, file=f"{name}.qcow2")
        data["disks"][name] = record

    return manifest(INCREMENTAL, change)


#: the commands that use a manifest's digest runs (prune: its merge keeps them)
USE_RUNS = frozenset({"verify", "prune"})
#: packed runs (format 2) out of range: a run, list, restore and serve do not read them
#: (a run plans from the manifest without decoding its runs), what uses them refuses
PACKED_RUNS: dict[str, Damage] = {
    "m-packed-run-zero-length": manifest(INCREMENTAL, lambda d: run0(d, 1, 0, packed=True)),
    "m-packed-run-huge-length": manifest(INCREMENTAL, lambda d: run0(d, 1, 1 << 62, True)),
    "m-packed-run-huge-offset": manifest(INCREMENTAL, lambda d: run0(d, 0, 1 << 63, True)),
    "m-packed-run-past-disk": manifest(INCREMENTAL, lambda d: run0(d, 2, 1 << 40, True)),
}

MANIFESTS: dict[str, Damage] = {
    "m-not-json": manifest_text("{"),
    "m-array": manifest_text("[1, 2]"),
    "m-nested": manifest_text("[" * 200000 + "]" * 200000),
    "m-huge-int-text": manifest_text('{"format": 1, "id": ' + "9" * 6000 + "}"),
    "m-disks-list": manifest(INCREMENTAL, lambda d: d.update(disks=[1])),
    "m-disk-string": manifest(INCREMENTAL, lambda d: d["disks"].update(vda="x")),
    "m-kind-number": manifest(INCREMENTAL, lambda d: d.update(kind=5)),
    "m-no-disks": manifest(INCREMENTAL, lambda d: d.pop("disks")),
    "m-no-parent": manifest(INCREMENTAL, lambda d: d.pop("parent")),
    "m-parent-list": manifest(INCREMENTAL, lambda d: d.update(parent=[FULL])),
    "m-parent-missing": manifest(INCREMENTAL, lambda d: d.update(parent="20251231T000000Z")),
    "m-parent-cycle": cycle,
    "m-id-mismatch": manifest(INCREMENTAL, lambda d: d.update(id=FULL)),
    "m-run-neg-length": manifest(INCREMENTAL, lambda d: run0(d, 1, -65536)),
    "m-run-neg-offset": manifest(INCREMENTAL, lambda d: run0(d, 0, -65536)),
    "m-run-huge-length": manifest(INCREMENTAL, lambda d: run0(d, 1, 1 << 62)),
    "m-run-huge-offset": manifest(INCREMENTAL, lambda d: run0(d, 0, 10**40)),
    "m-run-past-disk": manifest(INCREMENTAL, lambda d: run0(d, 2, 1 << 40)),
    "m-run-string": manifest(INCREMENTAL, lambda d: run0(d, 1, "65536")),
    "m-size-huge": manifest(INCREMENTAL, lambda d: d["disks"]["vda"].update(virtual_size=1 << 70)),
    "m-size-negative": manifest(INCREMENTAL, lambda d: d["disks"]["vda"].update(virtual_size=-1)),
    "m-duration-inf": manifest(INCREMENTAL, lambda d: d.update(duration=1e400)),
    "m-created-escape": manifest(INCREMENTAL, lambda d: d.update(created="\x1b]0;x\x07")),
    "m-file-traversal": traversal,
    "m-disk-traversal": rename_disk("../vda"),
    "m-disk-newline": rename_disk("vda\n"),
    "m-disk-slash": rename_disk("a/b"),
}


# ---- paths: symlinks and special files in the layout --------------------------------


def replace_with_symlink(relative: str, target: Callable[[Path, Path], Path]) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        path = vm / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(target(outside, vm))

    return damage


def replace_with_fifo(relative: str) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        (vm / relative).unlink()
        os.mkfifo(vm / relative)

    return damage


def replace_with_fifo_new(relative: str) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        os.mkfifo(vm / relative)

    return damage


HOSTILE_STATUS = json.dumps(
    {
        "last_run": {"result": "ok", "started": "x", "duration": [], "disks": {'a"}\n': 1}},
        "last_success": 5,
    }
)


def status_file(text: str) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        (vm / ".status.json").write_text(text)

    return damage


def vm_folder_symlink(vm: Path, outside: Path) -> None:
    shutil.rmtree(vm)
    vm.symlink_to(outside / "copy")


def backup_is_a_file(vm: Path, outside: Path) -> None:
    shutil.rmtree(vm / INCREMENTAL)
    (vm / INCREMENTAL).write_bytes(b"not a backup")


def image_is_a_folder(vm: Path, outside: Path) -> None:
    (vm / INCREMENTAL / "vda.qcow2").unlink()
    (vm / INCREMENTAL / "vda.qcow2").mkdir()


IMAGE = f"{INCREMENTAL}/vda.qcow2"
PATHS: dict[str, tuple[Damage, frozenset[str], str | None]] = {
    "p-backup-symlink": (
        replace_with_symlink(INCREMENTAL, lambda o, v: o / "copy" / INCREMENTAL),
        EVERYTHING_BUT_LIST,
        None,
    ),
    "p-image-symlink": (
        replace_with_symlink(IMAGE, lambda o, v: o / "copy" / IMAGE),
        READ_IMAGES,
        None,
    ),
    "p-image-to-canary": (
        replace_with_symlink(IMAGE, lambda o, v: canary(o)),
        READ_IMAGES,
        None,
    ),
    "p-parent-image-link": (
        replace_with_symlink(f"{FULL}/vda.qcow2", lambda o, v: o / "copy" / FULL / "vda.qcow2"),
        READ_IMAGES,
        None,
    ),
    "p-manifest-symlink": (
        replace_with_symlink(
            f"{INCREMENTAL}/manifest.json",
            lambda o, v: o / "copy" / INCREMENTAL / "manifest.json",
        ),
        EVERYTHING_BUT_LIST,
        None,
    ),
    "p-vm-symlink": (vm_folder_symlink, EVERYTHING_BUT_LIST, None),
    "p-lock-symlink": (
        replace_with_symlink(".lock", own_canary),
        frozenset({"prune"}),
        INCREMENTAL,
    ),
    "p-readers-symlink": (
        replace_with_symlink(".readers", own_canary),
        EVERYTHING_BUT_LIST,
        None,
    ),
    "p-manifest-fifo": (
        replace_with_fifo(f"{INCREMENTAL}/manifest.json"),
        EVERYTHING_BUT_LIST,
        None,
    ),
    "p-image-fifo": (replace_with_fifo(IMAGE), READ_IMAGES, None),
    "p-image-folder": (image_is_a_folder, READ_IMAGES, None),
    "p-backup-a-file": (backup_is_a_file, frozenset(), FULL),
    "p-status-fifo": (replace_with_fifo_new(".status.json"), frozenset(), INCREMENTAL),
    "p-status-symlink": (
        replace_with_symlink(".status.json", own_canary),
        frozenset(),
        INCREMENTAL,
    ),
    "p-status-hostile": (status_file(HOSTILE_STATUS), frozenset(), INCREMENTAL),
}


# ---- qcow2 headers and tables -------------------------------------------------------


def header(backup: str = INCREMENTAL, **kwargs: Any) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        options = {k: v(outside) if callable(v) else v for k, v in kwargs.items()}
        rewrite_cluster0(vm / backup / "vda.qcow2", **options)

    return damage


def data_file(**fields: int) -> Any:
    def extensions(outside: Path) -> list[tuple[int, bytes]]:
        return [
            (layout.EXT_BACKING_FORMAT, b"qcow2"),
            (DATA_FILE_EXT, str(canary(outside)).encode()),
        ]

    return header(extensions=extensions, **fields)


def entry(table: str, index: int, value: Callable[[Path], int], backup: str = FULL) -> Damage:
    def damage(vm: Path, outside: Path) -> None:
        image = vm / backup / "vda.qcow2"
        set_entry(image, table, index, value(image))

    return damage


def end(image: Path) -> int:
    return image.stat().st_size


def truncate(vm: Path, outside: Path) -> None:
    os.truncate(vm / IMAGE, 3 * 65536)


def not_qcow2(vm: Path, outside: Path) -> None:
    (vm / IMAGE).write_bytes(CANARY[: 4 * 65536])


QCOW2: dict[str, Damage] = {
    "q-data-file": data_file(incompatible=4),
    "q-data-file-raw": data_file(incompatible=4, autoclear=2),
    "q-data-file-name": data_file(),
    "q-unknown-incompat": header(incompatible=1 << 20),
    "q-dirty": header(incompatible=1),
    "q-extended-l2": header(incompatible=16),
    "q-lazy-refcounts": header(compatible=1),
    "q-bitmaps-bit": header(autoclear=1),
    "q-feature-table": header(
        extensions=[(layout.EXT_BACKING_FORMAT, b"qcow2"), (FEATURE_TABLE_EXT, bytes(48))]
    ),
    "q-backing-raw": header(extensions=[(layout.EXT_BACKING_FORMAT, b"raw")]),
    "q-backing-canary": header(backing=lambda o: str(canary(o)).encode()),
    "q-backing-traversal": header(backing=f"../../../outside/copy/{FULL}/vda.qcow2".encode()),
    "q-backing-in-full": header(
        FULL,
        backing=lambda o: str(canary(o)).encode(),
        extensions=[(layout.EXT_BACKING_FORMAT, b"raw")],
    ),
    "q-version-2": header(version=2),
    "q-header-104": header(header_length=104),
    "q-aes": header(crypt_method=1),
    "q-luks": header(crypt_method=2),
    "q-refcount-order": header(refcount_order=3),
    "q-cluster-4k": header(cluster_bits=12),
    "q-snapshot": header(nb_snapshots=1, snapshots_offset=65536),
    "q-zstd": header(compression_type=1, incompatible=8),
    "q-size-other": header(size=2 << 20),
    "q-l1-outside": header(l1_offset=1 << 40),
    "q-reftable-outside": header(refcount_table_offset=1 << 40),
    "q-l2-outside": entry("l1", 0, lambda i: (1 << 40) | layout.OFLAG_COPIED),
    "q-data-outside": entry("l2", 2, lambda i: (end(i) + (1 << 30)) | layout.OFLAG_COPIED),
    "q-compressed-out": entry(
        "l2", 4, lambda i: layout.OFLAG_COMPRESSED | (0xFF << 54) | (end(i) - 512)
    ),
    "q-refblock-outside": entry("refcount", 1, lambda i: 1 << 40),
    "q-truncated": truncate,
    "q-not-qcow2": not_qcow2,
}


def untouched(vm: Path, outside: Path) -> None:
    pass


def unknown_key(vm: Path, outside: Path) -> None:
    manifest(INCREMENTAL, lambda d: d.update(future={"x": [1]}))(vm, outside)


def run_past_the_file(vm: Path, outside: Path) -> None:
    manifest(INCREMENTAL, lambda d: run0(d, 0, 1 << 40, packed=True))(vm, outside)


def cases() -> list[Case]:
    found = [
        Case("c-untouched", "control", untouched, frozenset()),
        Case("c-unknown-key", "control", unknown_key, frozenset()),
        Case("m-run-past-file", "crafted manifests", run_past_the_file, frozenset({"verify"})),
    ]
    for name, damage in PACKED_RUNS.items():
        found.append(Case(name, "crafted manifests", damage, USE_RUNS))
    for name, damage in MANIFESTS.items():
        damaged = {"m-parent-cycle": (FULL,), "m-parent-missing": ()}.get(name, (INCREMENTAL,))
        found.append(
            Case(name, "crafted manifests", damage, EVERYTHING_BUT_LIST, None, (), damaged)
        )
    for name, (damage, refuse, point) in PATHS.items():
        found.append(Case(name, "symlinks and special files", damage, refuse, point))
    for name, damage in QCOW2.items():
        tainted = (
            (f"{FULL}/vda.qcow2",)
            if "full" in name
            or name.startswith(("q-l2", "q-data-out", "q-compressed", "q-refblock"))
            else (IMAGE,)
        )
        found.append(Case(name, "crafted qcow2 images", damage, READ_IMAGES, None, tainted))
    return found

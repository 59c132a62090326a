"""The qcow2 inspector accepts what backupd's writer writes and refuses every header,
extension and table entry the writer never produces."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.qcow2 import layout
from backupd.qcow2.inspector import (
    CRYPT_LUKS,
    EXT_FULL_DISK_ENCRYPTION,
    ImageFacts,
    ImageRefused,
    _check_l2_entries,
    _check_plain_l2,
    inspect_image,
)
from backupd.qcow2.writer import Qcow2Writer
from tests.backupd.crafted import (
    CLUSTER,
    FULL,
    INCREMENTAL,
    SIZE,
    base_chain,
    read_header,
    rewrite_cluster0,
    set_entry,
    table_entry,
)

DATA_FILE_EXT = 0x44415441
FEATURE_TABLE_EXT = 0x6803F857
BITMAPS_EXT = 0x23852875


def inspect(path: Path, *, allow_encryption: bool = False) -> ImageFacts:
    fd = os.open(path, os.O_RDONLY)
    try:
        return inspect_image(fd, allow_encryption=allow_encryption)
    finally:
        os.close(fd)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    vm = tmp_path / "guest1"
    base_chain(vm)
    return vm / FULL / "vda.qcow2", vm / INCREMENTAL / "vda.qcow2"


def test_writer_output_is_accepted(chain: tuple[Path, Path]) -> None:
    full, incremental = chain
    facts = inspect(full)
    assert (facts.virtual_size, facts.cluster_size, facts.backing_file) == (SIZE, CLUSTER, None)
    assert (facts.l2_tables, facts.data_clusters, facts.compressed_clusters) == (1, 2, 1)
    facts = inspect(incremental)
    assert facts.backing_file == f"../{FULL}/vda.qcow2"
    assert (facts.data_clusters, facts.compressed_clusters) == (1, 0)


@pytest.mark.parametrize(
    ("size", "cluster"),
    [(0, 65536), (1, 512), (3 * 65536 + 7, 65536), (200 << 20, 4096), (5 << 20, 2 << 20)],
)
def test_writer_output_of_any_shape_is_accepted(tmp_path: Path, size: int, cluster: int) -> None:
    writer = Qcow2Writer(tmp_path / "x.qcow2", size, cluster_size=cluster).open()
    if size:
        host = writer.allocate(0, cluster)
        os.pwrite(writer.fd, b"\x01" * cluster, host)
    writer.finish()
    facts = inspect(tmp_path / "x.qcow2")
    assert (facts.virtual_size, facts.cluster_size, facts.data_clusters) == (
        size,
        cluster,
        1 if size else 0,
    )


HEADERS: dict[str, tuple[dict[str, object], str]] = {
    "magic": ({"magic": b"QFI\x00"}, "not a qcow2 file"),
    "version 2": ({"version": 2}, "version 2"),
    "header length 104": ({"header_length": 104}, "header length 104"),
    "dirty bit": ({"incompatible": 1}, "incompatible feature bits 0x1"),
    "corrupt bit": ({"incompatible": 2}, "incompatible feature bits 0x2"),
    "data file bit": ({"incompatible": 4}, "incompatible feature bits 0x4"),
    "extended L2": ({"incompatible": 16}, "incompatible feature bits 0x10"),
    "unknown incompatible": ({"incompatible": 1 << 40}, "incompatible feature bits"),
    "lazy refcounts": ({"compatible": 1}, "compatible feature bits 0x1"),
    "bitmaps autoclear": ({"autoclear": 1}, "autoclear feature bits 0x1"),
    "raw data file autoclear": ({"autoclear": 2}, "autoclear feature bits 0x2"),
    "AES": ({"crypt_method": 1}, "encrypted (crypt method 1)"),
    "LUKS": ({"crypt_method": 2}, "encrypted (crypt method 2)"),
    "refcount order 3": ({"refcount_order": 3}, "refcount order 3"),
    "cluster bits 8": ({"cluster_bits": 8}, "cluster bits 8"),
    "cluster bits 22": ({"cluster_bits": 22}, "cluster bits 22"),
    "zstd": ({"compression_type": 1}, "compression type 1"),
    "snapshot": ({"nb_snapshots": 1, "snapshots_offset": 65536}, "internal snapshots"),
    "L1 too small": ({"l1_size": 0}, "L1 table of 0 entries"),
    "L1 too large": ({"l1_size": 3}, "L1 table of 3 entries"),
    "huge disk": ({"size": 1 << 60}, "L1 table of 1 entries"),
    "L1 past the end": ({"l1_offset": 1 << 40}, "L1 table at"),
    "L1 unaligned": ({"l1_offset": 65536 + 8}, "not cluster aligned"),
    "refcount table past the end": ({"refcount_table_offset": 1 << 40}, "refcount table"),
    "refcount table empty": ({"refcount_table_clusters": 0}, "refcount table"),
    "refcount table huge": ({"refcount_table_clusters": 1 << 20}, "refcount table"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_header_fields_the_writer_never_writes_are_refused(
    chain: tuple[Path, Path], case: str
) -> None:
    fields, reason = HEADERS[case]
    _, image = chain
    rewrite_cluster0(image, **fields)
    with pytest.raises(ImageRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        inspect(image)


def canary(tmp_path: Path) -> bytes:
    path = tmp_path / "outside" / "canary.raw"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"canary" * 1000)
    return str(path).encode()


EXTENSIONS: dict[str, Callable[[Path], tuple[list[tuple[int, bytes]], dict[str, object]]]] = {
    "external data file": lambda t: ([(DATA_FILE_EXT, canary(t))], {"incompatible": 4}),
    "data file name without the bit": lambda t: ([(DATA_FILE_EXT, canary(t))], {}),
    "feature name table": lambda t: ([(FEATURE_TABLE_EXT, bytes(48))], {}),
    "bitmaps": lambda t: ([(BITMAPS_EXT, bytes(24))], {}),
    "unknown": lambda t: ([(0x12345678, b"x")], {}),
    "encryption header": lambda t: ([(EXT_FULL_DISK_ENCRYPTION, bytes(16))], {}),
}


@pytest.mark.parametrize("case", sorted(EXTENSIONS))
def test_extensions_other_than_backing_format_are_refused(
    chain: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    _, image = chain
    extensions, fields = EXTENSIONS[case](tmp_path)
    rewrite_cluster0(
        image, extensions=[(layout.EXT_BACKING_FORMAT, b"qcow2"), *extensions], **fields
    )
    with pytest.raises(ImageRefused):
        inspect(image)


@pytest.mark.parametrize(
    ("extensions", "backing", "reason"),
    [
        ([(layout.EXT_BACKING_FORMAT, b"raw")], b"../x/vda.qcow2", "backing format b'raw'"),
        ([], b"../x/vda.qcow2", "backing format None"),
        ([(layout.EXT_BACKING_FORMAT, b"qcow2")], None, "without a backing file"),
        (
            [(layout.EXT_BACKING_FORMAT, b"qcow2"), (layout.EXT_BACKING_FORMAT, b"qcow2")],
            b"../x/vda.qcow2",
            "appears twice",
        ),
        ([(layout.EXT_BACKING_FORMAT, b"qcow2")], b"\xff\xfe", "not UTF-8"),
        ([(layout.EXT_BACKING_FORMAT, b"qcow2")], b"a\0b", "NUL"),
        ([(layout.EXT_BACKING_FORMAT, b"qcow2")], b"x" * 1024, "not where backupd writes it"),
    ],
)
def test_backing_names_and_formats(
    chain: tuple[Path, Path],
    extensions: list[tuple[int, bytes]],
    backing: bytes | None,
    reason: str,
) -> None:
    _, image = chain
    rewrite_cluster0(image, extensions=extensions, backing=backing)
    with pytest.raises(ImageRefused, match=reason):
        inspect(image)


def test_backing_name_elsewhere_and_no_end_marker(chain: tuple[Path, Path]) -> None:
    _, image = chain
    rewrite_cluster0(image, backing_offset=CLUSTER - 4)
    with pytest.raises(ImageRefused, match="not where backupd writes it"):
        inspect(image)
    with open(image, "r+b") as f:  # extensions that never end
        f.seek(layout.HEADER_LENGTH)
        f.write(struct.pack(">II", layout.EXT_BACKING_FORMAT, 8) * (CLUSTER // 16))
    with pytest.raises(ImageRefused):
        inspect(image)


@pytest.mark.parametrize(
    ("table", "index", "value", "reason"),
    [
        ("l1", 0, (1 << 40) | layout.OFLAG_COPIED, "L2 table at .* lies outside the file"),
        ("l1", 0, 65536 + 512, "not cluster aligned"),
        ("l1", 0, 65536 | 1, "reserved bits"),
        ("l2", 2, (1 << 40) | layout.OFLAG_COPIED, "data cluster at .* outside the file"),
        ("l2", 2, 65536 + 4096, "data cluster at .* outside the file"),
        ("l2", 2, 65536 | 2, "reserved bits"),
        ("l2", 2, 65536 | (1 << 56), "reserved bits"),
        ("l2", 3, layout.OFLAG_COMPRESSED | (1 << 40), "compressed cluster .* past the end"),
        ("l2", 3, "last sector + 255 more", "past the end"),
        ("l2", 3, layout.OFLAG_COMPRESSED | layout.OFLAG_COPIED | 65536, "copied flag"),
        ("refcount", 1, 1 << 40, "refcount block at .* outside the file"),
        ("refcount", 1, 65536 + 7, "refcount block"),
    ],
)
def test_tables_pointing_outside_the_file_are_refused(
    chain: tuple[Path, Path], table: str, index: int, value: int | str, reason: str
) -> None:
    full, _ = chain
    if isinstance(value, str):  # a compressed cluster of 256 sectors from the last one
        value = layout.OFLAG_COMPRESSED | (0xFF << 54) | (full.stat().st_size - 512)
    set_entry(full, table, index, value)
    with pytest.raises(ImageRefused, match=reason):
        inspect(full)


def test_untouched_table_entries_read_back(chain: tuple[Path, Path]) -> None:
    """The crafting helpers find the real entries (so the refusals above are of them)."""
    full, _ = chain
    _, l2 = table_entry(full, "l2", 0)
    assert l2 & layout.OFLAG_COPIED and (l2 & ~layout.OFLAG_COPIED) % CLUSTER == 0
    _, compressed = table_entry(full, "l2", 4)
    assert compressed & layout.OFLAG_COMPRESSED


def test_not_a_file_truncated_and_empty(tmp_path: Path, chain: tuple[Path, Path]) -> None:
    full, _ = chain
    with pytest.raises(ImageRefused, match="not a regular file"):
        inspect(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageRefused, match="shorter than a qcow2 header"):
        inspect(tmp_path / "empty")
    os.truncate(full, CLUSTER * 2)
    with pytest.raises(ImageRefused, match="outside the file"):
        inspect(full)
    (tmp_path / "raw").write_bytes(b"\0" * CLUSTER)
    with pytest.raises(ImageRefused, match="not a qcow2 file"):
        inspect(tmp_path / "raw")


def test_encryption_is_admitted_only_for_encrypted_vms(chain: tuple[Path, Path]) -> None:
    """LUKS (crypt method 2 with its header extension inside the file) is refused unless
    the VM is encrypted, and then only with a LUKS header backupd would write (the
    accepted case: tests/backupd/test_encryption.py)."""
    full, _ = chain
    pointer = struct.pack(">QQ", CLUSTER, 4096)
    rewrite_cluster0(
        full, extensions=[(EXT_FULL_DISK_ENCRYPTION, pointer)], crypt_method=CRYPT_LUKS
    )
    with pytest.raises(ImageRefused, match="encryption is not enabled"):
        inspect(full)
    with pytest.raises(ImageRefused, match="not a LUKS version 1 header"):
        inspect(full, allow_encryption=True)
    rewrite_cluster0(
        full,
        extensions=[(EXT_FULL_DISK_ENCRYPTION, struct.pack(">QQ", 1 << 40, 4096))],
        crypt_method=CRYPT_LUKS,
    )
    with pytest.raises(ImageRefused, match="encryption header"):
        inspect(full, allow_encryption=True)
    rewrite_cluster0(full, extensions=[], crypt_method=CRYPT_LUKS)
    with pytest.raises(ImageRefused, match="without its encryption header"):
        inspect(full, allow_encryption=True)
    assert read_header(full)["crypt_method"] == CRYPT_LUKS


ENTRY = st.one_of(
    st.just(0),
    st.just(layout.OFLAG_ZERO),
    st.integers(1, 40).map(lambda c: (c * CLUSTER) | layout.OFLAG_COPIED),
    st.integers(1, 40).map(lambda c: (c * CLUSTER) | layout.OFLAG_ZERO),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 63).map(lambda bit: (2 * CLUSTER) | (1 << bit)),
)


@given(st.lists(ENTRY, min_size=1, max_size=64), st.sampled_from([9, 12, 16, 21]))
@settings(max_examples=400, deadline=None)
def test_column_check_agrees_with_entry_check(entries: list[int], cluster_bits: int) -> None:
    """The fast L2 check accepts exactly the tables without compressed entries that the
    entry-by-entry check accepts, with the same count of data clusters."""
    padded = entries + [0] * (len(entries) % 2)
    table = struct.pack(f">{len(padded)}Q", *padded)
    file_size = 30 * CLUSTER
    fast = _check_plain_l2(table, cluster_bits, file_size)
    try:
        data, compressed = _check_l2_entries(table, cluster_bits, file_size)
    except ImageRefused:
        assert fast is None
        return
    assert fast == (data if compressed == 0 else None)

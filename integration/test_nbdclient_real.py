"""nbdclient against real servers: qemu-nbd (data, holes, dirty bitmaps, TLS, writes),
nbdkit, and the nbdclient CLI checked against nbdinfo / nbdcopy."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nbdclient
from nbdclient.extents import MappedExtent, map_dirty_first, map_export
from nbdclient.multiconn import close_all, connect_each
from nbdclient.values import Extent

from .harness.chain import make_qcow2, qemu_img_check, qemu_img_compare, qemu_io
from .harness.servers import make_certificates, nbd_server, nbdkit, qemu_nbd

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB qcow2: data at 1-3 MiB (0xab) and 40 MiB (0xcd), explicit zeros at 8 MiB,
    and a dirty bitmap b1 covering only the write at 40 MiB."""
    path = tmp_path / "disk.qcow2"
    make_qcow2(path, "64M", "write -P 0xab 1M 2M", "write -z 8M 1M")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b1"], check=True)
    qemu_io(path, "write -P 0xcd 40M 64k")
    return path


def expected_bytes() -> bytearray:
    data = bytearray(64 * MiB)
    data[1 * MiB : 3 * MiB] = b"\xab" * (2 * MiB)
    data[40 * MiB : 40 * MiB + 65536] = b"\xcd" * 65536
    return data


async def test_qemu_nbd_read_and_block_status(image: Path, sockdir: Path) -> None:
    with qemu_nbd(image, sockdir / "q.sock", extra=["-B", "b1"]) as uri:
        contexts = await nbdclient.list_meta_contexts(uri, queries=["qemu:dirty-bitmap:"])
        assert contexts == ["qemu:dirty-bitmap:b1"]
        wanted = ["base:allocation", "qemu:dirty-bitmap:b1"]
        async with await nbdclient.connect(uri, meta_contexts=wanted) as client:
            assert client.size == 64 * MiB and client.is_read_only()
            assert client.can_multi_conn()
            data = bytearray(64 * MiB)
            step = 4 * MiB
            await asyncio.gather(
                *(
                    client.pread_into(memoryview(data)[o : o + step], o)
                    for o in range(0, 64 * MiB, step)
                )
            )
            assert data == expected_bytes()
            mapped = await map_export(client, dirty_context="qemu:dirty-bitmap:b1")
    data_ranges = [(m.offset, m.length) for m in mapped if not m.zero]
    assert data_ranges == [(1 * MiB, 2 * MiB), (40 * MiB, 65536)]
    dirty = [(m.offset, m.length) for m in mapped if m.dirty]
    assert dirty == [(40 * MiB, 65536)]
    assert mapped[0].offset == 0 and mapped[-1].end == 64 * MiB


async def test_qemu_nbd_writes(tmp_path: Path, sockdir: Path) -> None:
    path = tmp_path / "w.qcow2"
    make_qcow2(path, "16M")
    with qemu_nbd(path, sockdir / "w.sock", read_only=False) as uri:
        async with await nbdclient.connect(uri, meta_contexts=["base:allocation"]) as c:
            assert c.can_zero() and c.can_trim() and c.can_fast_zero()
            await c.pwrite(b"\x11" * (3 * MiB), MiB, fua=True)
            await c.zero(MiB, 2 * MiB)
            await c.trim(65536, 0)
            await c.flush()
            await c.cache(MiB, 0)
            assert await c.pread(4, MiB) == b"\x11" * 4
            assert await c.pread(4, 2 * MiB) == bytes(4)
            with pytest.raises(ValueError, match="outside the export"):
                await c.pread(512, 16 * MiB - 256)  # refused before it reaches the wire
    qemu_img_check(path)


async def test_qemu_nbd_unknown_export(image: Path, sockdir: Path) -> None:
    with qemu_nbd(image, sockdir / "q.sock") as uri:
        with pytest.raises(nbdclient.NegotiationError) as info:
            await nbdclient.connect(uri, export="nope")
        assert "not present" in info.value.server_message or info.value.server_message


async def test_tls_with_qemu_nbd(image: Path, sockdir: Path, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "pki")
    creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off"
    with qemu_nbd(image, sockdir / "t.sock", extra=["--object", creds, "--tls-creds", "tls0"]) as u:
        # without TLS the server refuses (never plaintext data)
        with pytest.raises(nbdclient.NegotiationError, match="TLS"):
            await nbdclient.connect(u.replace("nbds+unix", "nbd+unix"))
        tls_uri = f"{u}&tls-certificates={certs}"
        async with await nbdclient.connect(tls_uri, meta_contexts=["base:allocation"]) as c:
            assert c.tls and c.structured_replies
            assert await c.pread(4, MiB) == b"\xab" * 4
        # a client that does not trust the server's CA fails cleanly
        wrong = make_certificates(tmp_path / "other")
        with pytest.raises(nbdclient.NegotiationError, match="TLS handshake failed"):
            await nbdclient.connect(f"{u}&tls-ca-file={wrong}/ca-cert.pem")


async def test_nbdkit_memory_and_pipelining(sockdir: Path) -> None:
    with nbdkit(sockdir / "k.sock", "memory", "32M") as uri:
        async with await nbdclient.connect(uri, meta_contexts=["base:allocation"]) as c:
            payload = bytes(range(256)) * 4096  # 1 MiB
            await asyncio.gather(*(c.pwrite(payload, i * MiB) for i in range(0, 32, 2)))
            results = await asyncio.gather(*(c.pread(MiB, i * MiB) for i in range(32)))
            for i, block in enumerate(results):
                assert block == (payload if i % 2 == 0 else bytes(MiB))
            mapped = await map_export(c)
            assert [(m.offset, m.length) for m in mapped if not m.zero] == [
                (i * MiB, MiB) for i in range(0, 32, 2)
            ]


async def test_nbdkit_error_filter_gives_request_error(sockdir: Path) -> None:
    with nbdkit(
        sockdir / "e.sock",
        "memory",
        "8M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        filters=["error"],
    ) as uri:
        async with await nbdclient.connect(uri) as c:
            with pytest.raises(nbdclient.RequestError) as info:
                await c.pread(4096, 0)
            assert info.value.errno_name == "EIO"
            await c.pwrite(b"still usable", 0)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdclient", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_against_nbdinfo_and_nbdcopy(image: Path, sockdir: Path, tmp_path: Path) -> None:
    with qemu_nbd(image, sockdir / "c.sock", extra=["-B", "b1"]) as uri:
        info = json.loads(run_cli("info", "--json", uri).stdout)
        ref = json.loads(
            subprocess.run(
                ["nbdinfo", "--json", uri], capture_output=True, text=True, check=True
            ).stdout
        )
        assert info["size"] == ref["exports"][0]["export-size"] == 64 * MiB
        assert "qemu:dirty-bitmap:b1" in info["meta_contexts"]
        assert run_cli("list", uri).stdout.split() == ["exp"]
        ours = json.loads(run_cli("map", "--json", uri).stdout)
        theirs = json.loads(
            subprocess.run(
                ["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True
            ).stdout
        )
        assert [(e["offset"], e["length"], e["flags"]) for e in ours] == [
            (e["offset"], e["length"], e["type"]) for e in theirs
        ]
        dirty = json.loads(
            run_cli("map", "--json", "--context", "qemu:dirty-bitmap:b1", uri).stdout
        )
        assert [(e["offset"], e["length"]) for e in dirty if e["flags"] & 1] == [(40 * MiB, 65536)]
        out = tmp_path / "copy.raw"
        result = run_cli("copy", uri, str(out))
        assert result.returncode == 0, result.stderr
        ref_out = tmp_path / "ref.raw"
        subprocess.run(["nbdcopy", uri, str(ref_out)], check=True)
        assert out.read_bytes() == ref_out.read_bytes() == expected_bytes()
        # thin: only the data is allocated
        assert out.stat().st_blocks * 512 <= 3 * MiB
        # a read size that splits the data runs unevenly gives the same bytes
        odd = tmp_path / "odd.raw"
        result = run_cli("copy", "--request-size", "12K", "--requests", "3", uri, str(odd))
        assert result.returncode == 0, result.stderr
        assert odd.read_bytes() == expected_bytes()
        bad_size = run_cli("copy", "--request-size", "64M", uri, str(odd))
        assert bad_size.returncode == 2 and "not between 4K and 32M" in bad_size.stderr
        bad = run_cli("info", "nbd+unix:///exp?socket=/nonexistent/sock")
        assert bad.returncode == 1 and "cannot connect" in bad.stderr
        assert "Traceback" not in bad.stderr
        usage = run_cli("info", "http://example.com/")
        assert usage.returncode == 2


def test_cli_copy_into_nbd_target(image: Path, sockdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.qcow2"
    make_qcow2(target, "64M", "write -P 0x77 8M 1M")  # stale data that must be zeroed
    with (
        qemu_nbd(image, sockdir / "s.sock") as src,
        qemu_nbd(target, sockdir / "d.sock", read_only=False) as dst,
    ):
        result = run_cli("copy", src, dst)
        assert result.returncode == 0, result.stderr
    cmp = qemu_img_compare(image, target)
    assert cmp.returncode == 0, cmp.stdout


async def test_nbd_server_reference(tmp_path: Path) -> None:
    raw = tmp_path / "ref.raw"
    data = bytes(range(256)) * (16 * 4096)  # 16 MiB
    raw.write_bytes(data)
    with nbd_server(raw, tmp_path) as uri:
        exports = await nbdclient.list_exports(uri)
        assert [e.name for e in exports] == ["exp"]
        async with await nbdclient.connect(uri, meta_contexts=["base:allocation"]) as c:
            assert c.size == len(data)
            assert not c.can_block_status()  # no structured replies: reads are simple
            parts = await asyncio.gather(*(c.pread(MiB, i * MiB) for i in range(16)))
            assert b"".join(parts) == data
            await c.pwrite(b"\xee" * 4096, 8192, fua=c.can_fua())
            if c.can_flush():
                await c.flush()
        out = tmp_path / "copy.raw"
        result = run_cli("copy", uri, str(out))
        assert result.returncode == 0, result.stderr
        expected = bytearray(data)
        expected[8192 : 8192 + 4096] = b"\xee" * 4096
        assert out.read_bytes() == expected
        info = json.loads(run_cli("info", "--json", uri).stdout)
        assert info["size"] == len(data) and info["meta_contexts"] == []


async def test_allocation_depth_and_map_text(tmp_path: Path, sockdir: Path) -> None:
    base = tmp_path / "base.qcow2"
    make_qcow2(base, "4M", "write -P 1 0 1M")
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
        check=True,
    )
    qemu_io(top, "write -P 2 2M 1M")
    with qemu_nbd(top, sockdir / "a.sock", extra=["-A"]) as uri:
        assert "qemu:allocation-depth" in await nbdclient.list_meta_contexts(uri, queries=["qemu:"])
        depth = json.loads(
            run_cli("map", "--json", "--context", "qemu:allocation-depth", uri).stdout
        )
        assert [(e["offset"], e["length"], e["flags"]) for e in depth] == [
            (0, MiB, 2),
            (MiB, MiB, 0),
            (2 * MiB, MiB, 1),
            (3 * MiB, MiB, 0),
        ]
        ours = run_cli("map", uri).stdout.split("\n")
        theirs = subprocess.run(
            ["nbdinfo", "--map", uri], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        assert [line.split() for line in ours if line] == [line.split() for line in theirs if line]


async def test_nbdkit_delay_filter_pipelines(sockdir: Path) -> None:
    with nbdkit(sockdir / "d.sock", "memory", "8M", "rdelay=200ms", filters=["delay"]) as uri:
        async with await nbdclient.connect(uri) as c:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.gather(*(c.pread(65536, i * 65536) for i in range(8)))
            assert loop.time() - start < 8 * 0.2  # in flight together, not one by one
        c = await nbdclient.connect(uri, request_timeout=0.05)
        with pytest.raises(nbdclient.NBDTimeoutError):
            await c.pread(512, 0)
        # the timed-out read's late reply is consumed; the connection goes on
        c.request_timeout = None
        assert await asyncio.wait_for(c.pread(512, 0), 5) == bytes(512)
        await c.disconnect()


async def test_dirty_first_map_equals_the_whole_map(tmp_path: Path, sockdir: Path) -> None:
    """What changed, mapped without the disk's allocation, is exactly what the whole
    map (allocation and bitmap together) says of every dirty byte; and the allocation
    connection is asked only about the dirty ranges."""
    image = make_qcow2(
        tmp_path / "d.qcow2", "64M", *(f"write -P 7 {n}M 64k" for n in range(0, 64, 2))
    )
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", str(image), "b0"], check=True)
    qemu_io(image, "write -P 9 5M 64k", "write -z 9M 128k", "write -P 3 20M 1M", "discard 40M 64k")
    context = "qemu:dirty-bitmap:b0"
    with qemu_nbd(image, sockdir / "d.sock", extra=["-B", "b0"]) as uri:
        async with await nbdclient.connect(uri, meta_contexts=["base:allocation", context]) as both:
            whole = await map_export(both, dirty_context=context)
        dirty_client, allocation_client = await connect_each(uri, [[context], ["base:allocation"]])
        asked: list[tuple[int, int]] = []
        original = allocation_client.block_status_many

        async def spying(ranges: list[tuple[int, int]]) -> list[dict[str, list[Extent]]]:
            asked.extend((offset, offset + length) for length, offset in ranges)
            return await original(ranges)

        allocation_client.block_status_many = spying  # type: ignore[method-assign]
        try:
            first = await map_dirty_first(dirty_client, context, allocation_client)
        finally:
            await close_all([dirty_client, allocation_client])

    def dirty_bytes(extents: list[MappedExtent]) -> list[tuple[int, int, bool, bool]]:
        return [(e.offset, e.end, e.zero, e.hole) for e in extents if e.dirty]

    assert dirty_bytes(first) == dirty_bytes(whole)
    assert dirty_bytes(first)[0][0] == 5 << 20  # the first change
    dirty = [(e.offset, e.end) for e in first if e.dirty]
    assert asked and all(any(s <= a and b <= e for s, e in dirty) for a, b in asked), asked
    assert sum(e.length for e in first) == 64 << 20  # the whole export, once

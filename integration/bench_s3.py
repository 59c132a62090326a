"""S3 client libraries side by side against the test suite's Swift (s3api) on loopback.

    .venv/bin/python -m integration.bench_s3 [--rounds 2] [--cases up8,get2m] [--signed]

Needs ``pip install boto3 obstore`` (backupd itself uses only aiobotocore).  Starts a
private Swift (``integration.harness.s3server``, its proxy with ``--proxy-workers`` 2
processes), seeds one bucket, then runs every library in its own process (so imports
and peak RSS are its own), alternating libraries round by round, and prints medians:

- ``upNN``: a multipart upload of 1 GiB from memory in parts of NN MiB, 4 in flight
  (aiobotocore and boto3 through the part API, obstore through its own multipart writer);
- ``getNN``: 256 MiB of ranged GETs of NN KiB/MiB at random aligned offsets of a
  256 MiB object, 8 in flight, each received into a preallocated buffer;
- ``list1000``: listing a prefix of 1,000 keys.

Each cell: throughput (or time), the client's CPU seconds (user+system, all threads)
and its peak RSS during that case (``VmHWM``, reset before each case).  The source of
the uploads is one 64 MiB random block (parts are slices of it), so about 64 MiB of
every RSS figure is the benchmark's own.  Payloads go UNSIGNED unless ``--signed``
(SigV4 over the body: a SHA-256 of every byte sent).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from integration.bench_s3_clients import LIBRARIES, Client, Target

MiB = 1 << 20
UPLOAD = 1024 * MiB
BLOCK = 64 * MiB
RANGE_OBJECT = 256 * MiB
RANGE_TOTAL = 256 * MiB
UPLOAD_INFLIGHT = 4
GET_INFLIGHT = 8
LIST_KEYS = 1000
CASES: dict[str, str] = {
    "up8": "upload 1 GiB, 8 MiB parts, 4 in flight",
    "up16": "upload 1 GiB, 16 MiB parts, 4 in flight",
    "up32": "upload 1 GiB, 32 MiB parts, 4 in flight",
    "up64": "upload 1 GiB, 64 MiB parts, 4 in flight",
    "get512k": "ranged GETs of 512 KiB (256 MiB), 8 in flight",
    "get2m": "ranged GETs of 2 MiB (256 MiB), 8 in flight",
    "get8m": "ranged GETs of 8 MiB (256 MiB), 8 in flight",
    "list1000": "list a prefix of 1,000 keys",
}
ENV = "BENCH_S3_TARGET"  # the target (with its secret) reaches a child by environment


def _block() -> bytes:
    return random.Random(7).randbytes(BLOCK)


# -- in the child: one library, the chosen cases ----------------------------------


def _peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return _status("VmHWM")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _case(client: Client, case: str, block: bytes, lib: str) -> float:
    """Runs one case; returns the bytes it moved (0 for listing)."""
    view = memoryview(block)
    if case.startswith("up"):
        part = int(case[2:]) * MiB
        parts = [view[(i * part) % BLOCK :][:part] for i in range(UPLOAD // part)]
        await client.upload(f"up/{lib}/{case}", parts, UPLOAD_INFLIGHT)
        return UPLOAD
    if case.startswith("get"):
        size = int(case[3:-1]) << (10 if case.endswith("k") else 20)
        rng = random.Random(size)
        offsets = [rng.randrange(RANGE_OBJECT // size) * size for _ in range(RANGE_TOTAL // size)]
        buffers = [memoryview(bytearray(size)) for _ in range(GET_INFLIGHT)]
        last: dict[int, int] = {}

        async def reader(slot: int) -> None:
            while offsets:
                offset = offsets.pop()
                await client.read_range("range", offset, buffers[slot])
                last[slot] = offset

        async with asyncio.TaskGroup() as group:
            for slot in range(GET_INFLIGHT):
                group.create_task(reader(slot))
        for slot, offset in last.items():  # the object is the block four times over
            start = offset % BLOCK
            if buffers[slot] != view[start : start + size]:
                raise AssertionError(f"{lib}: wrong bytes at {offset}")
        return RANGE_TOTAL
    if case == "list1000":
        found = await client.count("list/")
        if found != LIST_KEYS:
            raise AssertionError(f"{lib}: listed {found} keys, not {LIST_KEYS}")
        return 0
    raise ValueError(f"unknown case {case}")


async def _child(lib: str, cases: Sequence[str]) -> None:
    target = Target(**json.loads(os.environ[ENV]))
    block = _block()
    async with LIBRARIES[lib].open(target) as client:
        print(json.dumps({"case": "baseline", "rss": _status("VmRSS")}), flush=True)
        for case in cases:
            _peak_reset()
            cpu, started = _cpu(), time.perf_counter()
            moved = await _case(client, case, block, lib)
            seconds = time.perf_counter() - started
            result = {"case": case, "s": seconds, "cpu": _cpu() - cpu, "rss": _peak_rss()}
            print(json.dumps({**result, "bytes": moved}), flush=True)
            if case.startswith("up"):
                await client.delete([f"up/{lib}/{case}"])


# -- in the parent: the server, the seed, the rounds, the table --------------------


def _seed(server: Any, bucket: str) -> None:
    import botocore.session
    from botocore.config import Config

    s3 = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key_id,
        aws_secret_access_key=server.secret_access_key,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            max_pool_connections=16,
        ),
    )
    s3.create_bucket(Bucket=bucket)
    block = _block()
    upload = s3.create_multipart_upload(Bucket=bucket, Key="range")["UploadId"]
    parts = []
    for number in range(1, RANGE_OBJECT // BLOCK + 1):
        r = s3.upload_part(
            Bucket=bucket, Key="range", UploadId=upload, PartNumber=number, Body=block
        )
        parts.append({"PartNumber": number, "ETag": r["ETag"]})
    s3.complete_multipart_upload(
        Bucket=bucket, Key="range", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(Bucket=bucket, Key=f"list/{i:05d}", Body=b"x"),
                range(LIST_KEYS),
            )
        )


def _run_child(lib: str, cases: Sequence[str], target: Target) -> list[dict[str, Any]]:
    env = {**os.environ, ENV: json.dumps(dataclasses.asdict(target))}
    proc = subprocess.run(
        [sys.executable, "-m", "integration.bench_s3", "--child", lib, "--cases", ",".join(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{lib} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _cell(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return "-"
    s = statistics.median(x["s"] for x in samples)
    cpu = statistics.median(x["cpu"] for x in samples)
    rss = max(x["rss"] for x in samples) / MiB
    moved = samples[0]["bytes"]
    speed = f"{moved / MiB / s:5.0f} MiB/s" if moved else f"{s * 1000:6.1f} ms"
    return f"{speed} cpu {cpu:5.2f}s {rss:4.0f}M"


def _table(results: dict[str, dict[str, list[dict[str, Any]]]], cases: Sequence[str]) -> None:
    libs = list(results)
    width = 32
    print(f"{'case':<46}" + "".join(f"{lib:<{width}}" for lib in libs))
    print(
        f"{'baseline RSS (imports + 64 MiB source)':<46}"
        + "".join(
            f"{max(x['rss'] for x in results[lib]['baseline']) / MiB:>5.0f}M".ljust(width)
            for lib in libs
        )
    )
    for case in cases:
        print(
            f"{CASES[case]:<46}" + "".join(f"{_cell(results[lib][case]):<{width}}" for lib in libs)
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--libs", default=",".join(LIBRARIES))
    parser.add_argument("--signed", action="store_true", help="SigV4 over every payload")
    parser.add_argument("--proxy-workers", type=int, default=2, help="Swift proxy processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.child:
        asyncio.run(_child(args.child, cases))
        return 0

    from integration.harness.s3server import SwiftS3Server

    libs = args.libs.split(",")
    modules = {"aiobotocore": "aiobotocore", "boto3+threads": "boto3", "obstore": "obstore"}
    for lib in libs:
        if lib not in modules:
            parser.error(f"unknown library {lib!r}; choose from {', '.join(modules)}")
        if importlib.util.find_spec(modules[lib]) is None:
            parser.error(f"{lib} needs 'pip install {modules[lib]}' (backupd does not use it)")
    with SwiftS3Server(keep_logs=False, proxy_workers=args.proxy_workers) as server:
        bucket = "bench-s3"
        _seed(server, bucket)
        target = Target(
            server.endpoint_url,
            server.region,
            server.access_key_id,
            server.secret_access_key,
            bucket,
            args.signed,
        )
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            lib: {c: [] for c in ["baseline", *cases]} for lib in libs
        }
        server_peak = 0
        for round_ in range(args.rounds):
            for lib in libs[round_ % len(libs) :] + libs[: round_ % len(libs)]:
                for sample in _run_child(lib, cases, target):
                    results[lib][sample["case"]].append(sample)
                server_peak = max(server_peak, server.rss_bytes())
        print(
            f"S3 clients against Swift {server.endpoint_url} (s3api, 1 replica, loopback), "
            f"{'signed' if args.signed else 'unsigned'} payloads, {args.rounds} round(s), "
            f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        _table(results, cases)
        print(f"Swift's own RSS after the runs: {server_peak / MiB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

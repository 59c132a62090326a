"""TLS speed: ``nbdclient copy`` beside ``nbdcopy`` over plaintext, X.509 and TLS-PSK.

    .venv/bin/python -m integration.bench_tls [--rounds 5] [--size-mib 1024]

One qemu-nbd per transport serves the same raw file of random data (read-only,
multi-conn) on a private unix socket; each client copies the whole export to ``null:``,
alternating, for several rounds.  The table shows medians of the wall time, of the
client's CPU time and of qemu-nbd's CPU time for that copy, for nbdclient and for
nbdcopy (libnbd, GnuTLS) on the same export, and the TLS version and suite nbdclient
negotiated.  On a shared machine the wall time follows the load; CPU seconds do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from integration.harness.servers import (
    make_certificates,
    make_psk_keys,
    stop,
    wait_for_socket,
)
from integration.harness.servers import qemu_nbd_psk_args as psk_args
from nbdclient._negotiate import Negotiator
from nbdclient.uri import parse_uri

MiB = 1 << 20


def make_image(path: Path, size: int) -> None:
    rng = random.Random(20)
    block = rng.randbytes(8 * MiB)
    with open(path, "wb") as file:
        for _ in range(size // len(block)):
            file.write(block)


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], server: int) -> tuple[float, float, float]:
    """Wall time, the command's CPU time and the server's CPU time for one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    served = cpu_seconds(server)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_tls: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return took, client, cpu_seconds(server) - served


async def negotiated(uri: str) -> str:
    """The TLS version and suite nbdclient gets on ``uri``."""
    parsed = parse_uri(uri)
    if parsed.tls is None:
        return "-"
    negotiator = await Negotiator.open(parsed)
    try:
        await negotiator.greeting()
        await negotiator.starttls(parsed.tls, None)
        session = negotiator.writer.get_extra_info("ssl_object")
        return f"{session.version()} {session.cipher()[0]}"
    finally:
        await negotiator.abort()


@contextlib.contextmanager
def transports(image: Path, work: Path) -> Iterator[list[tuple[str, int, str, str]]]:
    """(name, qemu-nbd pid, nbdclient URI, nbdcopy URI) per transport, servers running."""
    certs = make_certificates(work / "pki")
    keys = make_psk_keys(work / "psk", "bench")
    x509 = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off"
    setups = [
        ("plaintext", []),
        ("X.509", ["--object", x509, "--tls-creds", "tls0"]),
        ("PSK", psk_args(keys.parent)),
        ("PSK, TLS 1.2 only", psk_args(keys.parent, priority="NORMAL:-VERS-TLS1.3")),
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rows = []
        for number, (name, extra) in enumerate(setups):
            sock = work / f"s{number}.sock"
            args = ["qemu-nbd", "-r", "-f", "raw", "-t", "-e", "8", "-x", "exp", "-k", str(sock)]
            proc = subprocess.Popen([*args, *extra, str(image)], stderr=subprocess.PIPE)
            procs.append(proc)
            wait_for_socket(sock, proc)
            uri = f"nbd{'s' if extra else ''}+unix:///exp?socket={sock}"
            if name == "X.509":
                ours = theirs = f"{uri}&tls-certificates={certs}"
            elif name.startswith("PSK"):
                ours = f"{uri}&tls-psk-file={keys}&tls-username=bench"
                theirs = f"nbds+unix://bench@/exp?socket={sock}&tls-psk-file={keys}"
            else:
                ours = theirs = uri
            rows.append((name, proc.pid, ours, theirs))
        yield rows
    finally:
        for proc in procs:
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="bkd-tls-", dir="/tmp"))
    data_dir = Path(tempfile.mkdtemp(prefix="bkd-tls-", dir="/var/tmp"))
    try:
        image = data_dir / "random.raw"
        make_image(image, size)
        with transports(image, work) as rows:
            ours_cmd = [sys.executable, "-m", "nbdclient", "copy", "-q"]
            print(f"copy of {args.size_mib} MiB of random data to null:, median of {args.rounds}")
            print("  (wall s / client CPU s / qemu-nbd CPU s)")
            print(f"  {'transport':<19} {'nbdclient':>20} {'nbdcopy':>20}  nbdclient's TLS session")
            for name, pid, ours, theirs in rows:
                runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "theirs": []}
                for _ in range(args.rounds):
                    runs["ours"].append(run([*ours_cmd, ours, "null:"], pid))
                    runs["theirs"].append(run(["nbdcopy", theirs, "null:"], pid))
                cells = []
                for key in ("ours", "theirs"):
                    columns = zip(*runs[key], strict=True)
                    wall, client, server = (statistics.median(x) for x in columns)
                    cells.append(f"{wall:6.2f} /{client:5.2f} /{server:5.2f}")
                session = asyncio.run(negotiated(ours))
                print(f"  {name:<19} {cells[0]:>20} {cells[1]:>20}  {session}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

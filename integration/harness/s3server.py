"""A real S3 server for tests and benchmarks: OpenStack Swift (Debian's packages) with
its ``s3api`` and ``tempauth`` middlewares, on 127.0.0.1.

One replica on one folder: an account, a container and an object server, a proxy and a
private memcached, each started by hand on a free loopback port (no systemd, no
system-wide configuration besides Debian's own ``/etc/swift/swift.conf``, which gives
the hash suffix and the default storage policy).  Every process is started by this
module and stopped by its pid (and gets SIGKILL should its parent die first: ``setpriv
--pdeathsig``); each writes its log into ``<workdir>/logs/``.

S3 side: path-style, SigV4, region ``us-east-1``; access keys are tempauth's
``account:user``.  Known limits of Swift's s3api (2.30): no ``aws-chunked`` streaming
uploads and no conditional PUT (both 501), object lock silently ignored, DeleteObjects
needs Content-MD5.

    python -m integration.harness.s3server     # start one, print its settings, Ctrl-C stops
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from integration.harness.servers import free_port

SWIFT_PACKAGES = (
    "swift swift-proxy swift-object swift-container swift-account python3-swift memcached"
)
SYSTEM_PYTHON = "/usr/bin/python3"
REGION = "us-east-1"
ACCOUNT = "backupd"
PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3api "
    "tempauth copy container-quotas slo dlo versioned_writes symlink proxy-logging proxy-server"
)
MAX_PARTS = 10000
START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class S3Endpoint:
    """What a client needs to reach the server as one user."""

    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str


def _common(port: int, swift_dir: Path, name: str, syslog_port: int, workers: int = 0) -> str:
    # Logs go to the console (``-v``, redirected into logs/<name>.log); Swift adds a
    # syslog handler regardless, pointed at a loopback UDP port this harness holds
    # and never reads (the kernel drops what does not fit).
    return (
        f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {port}\nworkers = {workers}\n"
        f"swift_dir = {swift_dir}\nuser = {getpass.getuser()}\n"
        f"log_name = {name}\nlog_udp_host = 127.0.0.1\n"
        f"log_udp_port = {syslog_port}\n"
    )


def _storage_conf(kind: str, port: int, workdir: Path, syslog_port: int) -> str:
    return (
        _common(port, workdir, f"{kind}-server", syslog_port)
        + f"devices = {workdir / 'srv'}\nmount_check = false\ndisable_fallocate = true\n"
        + f"[pipeline:main]\npipeline = {kind}-server\n"
        + f"[app:{kind}-server]\nuse = egg:swift#{kind}\n"
        + (f"[{kind}-replicator]\n[{kind}-updater]\n[{kind}-auditor]\n")
    )


def _proxy_conf(
    port: int,
    workdir: Path,
    syslog_port: int,
    memcached_port: int,
    users: dict[str, str],
    workers: int,
) -> str:
    filters = {
        "catch_errors": "catch_errors",
        "gatekeeper": "gatekeeper",
        "healthcheck": "healthcheck",
        "proxy-logging": "proxy_logging",
        "listing_formats": "listing_formats",
        "bulk": "bulk",
        "copy": "copy",
        "container-quotas": "container_quotas",
        "dlo": "dlo",
        "versioned_writes": "versioned_writes",
        "symlink": "symlink",
    }
    text = _common(port, workdir, "proxy-server", syslog_port, workers)
    text += f"[pipeline:main]\npipeline = {PIPELINE}\n"
    text += "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
    for section, egg in filters.items():
        text += f"[filter:{section}]\nuse = egg:swift#{egg}\n"
    text += "[filter:cache]\nuse = egg:swift#memcache\n"
    text += f"memcache_servers = 127.0.0.1:{memcached_port}\n"
    text += f"[filter:slo]\nuse = egg:swift#slo\nmax_manifest_segments = {MAX_PARTS}\n"
    text += (
        f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {REGION}\n"
        f"max_upload_part_num = {MAX_PARTS}\n"
    )
    text += "[filter:tempauth]\nuse = egg:swift#tempauth\n"
    for user, line in users.items():
        text += f"user_{ACCOUNT}_{user} = {line}\n"
    return text


def _check_xattrs(directory: Path) -> None:
    probe = directory / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.swift.probe", b"x" * 200)
    except OSError as e:
        raise RuntimeError(
            f"{directory} does not take user extended attributes ({e.strerror}): "
            "Swift's object server needs them"
        ) from None
    finally:
        probe.unlink()


class SwiftS3Server:
    """One Swift with s3api on loopback ports, in ``workdir`` (made when not given).

    ``start()`` returns when the proxy answers its health check; ``stop()`` kills every
    process it started, by pid, and removes the stored objects (the logs stay unless the
    folder was made here and ``keep_logs`` is false).
    """

    def __init__(
        self, workdir: Path | None = None, *, keep_logs: bool = True, proxy_workers: int = 0
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="bkd-s3-", dir="/tmp"))
        self.keep_logs = keep_logs
        #: 0: the proxy serves in its own process; N: it forks N workers (faster, bigger)
        self.proxy_workers = proxy_workers
        self.region = REGION
        secret = secrets.token_urlsafe(24)
        #: full rights on the account (tempauth ``.admin``)
        self.admin = S3Endpoint("", REGION, f"{ACCOUNT}:tester", secret)
        #: a user of the same account without any right on its buckets
        self.reader = S3Endpoint("", REGION, f"{ACCOUNT}:reader", secrets.token_urlsafe(24))
        self.port = 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._syslog: socket.socket | None = None

    # -- what clients use ---------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_key_id(self) -> str:
        return self.admin.access_key_id

    @property
    def secret_access_key(self) -> str:
        return self.admin.secret_access_key

    def endpoint(self, user: S3Endpoint | None = None) -> S3Endpoint:
        """The settings of ``user`` (the admin by default) with this server's URL."""
        u = user or self.admin
        return S3Endpoint(self.endpoint_url, u.region, u.access_key_id, u.secret_access_key)

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def rss_bytes(self) -> int:
        """Resident memory of all of the server's processes now (forked proxy workers
        included)."""
        pids = set(self.pids.values())
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in pids:
                    pids.add(int(stat.parent.name))
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    # -- lifecycle ----------------------------------------------------------------

    def start(self, attempts: int = 3) -> SwiftS3Server:
        """Start every process; another port is tried when one was taken meanwhile."""
        missing = [t for t in ("swift-proxy-server", "memcached") if not shutil.which(t)]
        if missing or not Path(SYSTEM_PYTHON).exists():
            raise RuntimeError(
                f"{', '.join(missing) or SYSTEM_PYTHON} not found: "
                f"apt-get install {SWIFT_PACKAGES} (scripts/setup.sh does)"
            )
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        devices = self.workdir / "srv" / "d1"
        devices.mkdir(parents=True, exist_ok=True)
        _check_xattrs(devices)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._syslog.bind(("127.0.0.1", 0))
        syslog_port = self._syslog.getsockname()[1]
        ports = {name: free_port() for name in ("account", "container", "object", "memcached")}
        self.port = free_port()
        self._spawn("memcached", self._memcached_args(ports["memcached"]))
        for kind in ("account", "container", "object"):
            conf = self.workdir / f"{kind}-server.conf"
            conf.write_text(_storage_conf(kind, ports[kind], self.workdir, syslog_port))
            self._spawn(kind, [f"swift-{kind}-server", str(conf), "-v"])
        # the storage servers start without rings; the proxy needs them
        subprocess.run(
            [SYSTEM_PYTHON, str(Path(__file__).with_name("swift_rings.py")), str(self.workdir)]
            + [str(ports[k]) for k in ("account", "container", "object")],
            check=True,
            capture_output=True,
        )
        users = {
            "tester": f"{self.admin.secret_access_key} .admin",
            "reader": self.reader.secret_access_key,
        }
        conf = self.workdir / "proxy-server.conf"
        conf.write_text(
            _proxy_conf(
                self.port, self.workdir, syslog_port, ports["memcached"], users, self.proxy_workers
            )
        )
        self._spawn("proxy", ["swift-proxy-server", str(conf), "-v"])
        self._wait_ready([ports[k] for k in ("account", "container", "object", "memcached")])

    @staticmethod
    def _memcached_args(port: int) -> list[str]:
        args = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses root without naming the user
        return args

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.workdir / "logs" / f"{name}.log", "ab") as log:
            # setpriv (util-linux) sets the parent-death signal and execs the server:
            # no Python code between fork and exec in a process that has threads
            self._procs[name] = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self, ports: list[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(ports)
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"swift {name} exited with {proc.returncode}: {self._log_tail(name)}"
                    )
            waiting = [p for p in waiting if not _listening(p)]
            if not waiting and self._healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"swift did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/healthcheck", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _log_tail(self, name: str, lines: int = 5) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Kill every process this server started (by pid) and drop the stored data."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None
        shutil.rmtree(self.workdir / "srv", ignore_errors=True)
        if self._own_dir and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_endpoint(self) -> None:
        """Stop the proxy (the S3 endpoint) alone: clients get "connection refused"
        until :meth:`start_endpoint`; the stored objects stay."""
        proc = self._procs.pop("proxy", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def start_endpoint(self) -> None:
        """Start the proxy again on its port, after :meth:`stop_endpoint`."""
        conf = self.workdir / "proxy-server.conf"
        self._spawn("proxy", ["swift-proxy-server", str(conf), "-v"])
        self._wait_ready([])

    def __enter__(self) -> SwiftS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- Swift's own API, for what S3 cannot set -------------------------------------

    def _swift(self, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        """One request to Swift's own API, as the admin user."""
        auth = urllib.request.Request(
            f"{self.endpoint_url}/auth/v1.0",
            headers={"X-Auth-User": self.access_key_id, "X-Auth-Key": self.secret_access_key},
        )
        with urllib.request.urlopen(auth, timeout=10) as r:
            token, storage_url = r.headers["X-Auth-Token"], r.headers["X-Storage-Url"]
        request = urllib.request.Request(
            f"{storage_url}/{path}",
            method=method,
            headers={"X-Auth-Token": token, **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            if r.status // 100 != 2:
                raise RuntimeError(f"swift {method} {path}: {r.status}")

    def create_bucket(self, bucket: str) -> None:
        """A new bucket (a Swift container) of the admin user's account."""
        self._swift("PUT", bucket)

    def set_bucket_quota(self, bucket: str, max_bytes: int) -> None:
        """A byte quota on one bucket (Swift's container quota): uploads that would
        exceed it are refused with 413, which s3api reports as ``EntityTooLarge``."""
        self._swift("POST", bucket, {"X-Container-Meta-Quota-Bytes": str(max_bytes)})


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def main() -> int:
    """Start a server, print how to reach it, serve until Ctrl-C or SIGTERM."""
    server = SwiftS3Server(keep_logs=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.monotonic()
    try:
        server.start()
        print(
            f"endpoint_url={server.endpoint_url}\nregion={server.region}\n"
            f"access_key_id={server.access_key_id}\n"
            f"secret_access_key={server.secret_access_key}\n"
            f"# ready in {time.monotonic() - started:.1f} s, logs in {server.workdir}/logs, "
            "Ctrl-C stops",
            flush=True,
        )
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

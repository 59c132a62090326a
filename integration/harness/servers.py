"""Real NBD servers for tests: qemu-nbd and nbdkit on private unix sockets, X.509
certificates and pre-shared keys for TLS.  Every launcher kills what it started, by pid."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err.strip()}")
        time.sleep(0.02)
    raise RuntimeError(f"socket {path} did not appear")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def qemu_nbd(
    image: Path,
    sock: Path,
    *,
    fmt: str = "qcow2",
    export: str = "exp",
    read_only: bool = True,
    shared: int = 8,
    extra: Sequence[str] = (),
) -> Iterator[str]:
    """``qemu-nbd`` serving ``image``; yields the NBD URI."""
    args = ["qemu-nbd", "-f", fmt, "-k", str(sock), "-x", export, "-t", "-e", str(shared)]
    if read_only:
        args.append("-r")
    proc = subprocess.Popen([*args, *extra, str(image)], stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        scheme = "nbds+unix" if any("tls-creds" in a for a in extra) else "nbd+unix"
        yield f"{scheme}:///{export}?socket={sock}"
    finally:
        stop(proc)


@contextlib.contextmanager
def nbdkit(sock: Path, plugin: str, *args: str, filters: Sequence[str] = ()) -> Iterator[str]:
    """``nbdkit`` with a plugin (and filters) on a unix socket; yields the NBD URI."""
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock)]
    for name in filters:
        cmd += ["--filter", name]
    proc = subprocess.Popen([*cmd, plugin, *args], stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop(proc)


def make_certificates(directory: Path) -> Path:
    """A CA, a server certificate for ``localhost`` and a client certificate, in the
    file names qemu's tls-creds-x509 and the NBD URI ``tls-certificates`` use."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            f"{role}-key.pem",
            "-out",
            f"{role}.csr",
        )
        ext = directory / f"{role}.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{role}.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.name,
            "-out",
            f"{role}-cert.pem",
        )
    for key in directory.glob("*-key.pem"):
        os.chmod(key, 0o600)
    return directory


def make_psk_keys(directory: Path, *users: str) -> Path:
    """``keys.psk`` (the file qemu's tls-creds-psk reads in its folder) with a random
    256-bit key per user, as ``psktool`` writes it; returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "keys.psk"
    path.write_text("".join(f"{user}:{secrets.token_hex(32)}\n" for user in users))
    path.chmod(0o600)
    return path


def qemu_nbd_psk_args(directory: Path, *, priority: str | None = None) -> list[str]:
    """qemu-nbd arguments for a TLS-PSK server reading
    ``directory/keys.psk`` (the object as JSON)."""
    creds: dict[str, str] = {
        "qom-type": "tls-creds-psk",
        "id": "tls0",
        "endpoint": "server",
        "dir": str(directory),
    }
    if priority is not None:
        creds["priority"] = priority
    return ["--object", json.dumps(creds), "--tls-creds", "tls0"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def nbd_server(image: Path, workdir: Path, *, export: str = "exp") -> Iterator[str]:
    """The reference ``nbd-server`` on a loopback TCP port; yields the NBD URI.  It
    daemonizes, so it is stopped by the pid in the pid file it writes."""
    port = free_port()
    config = workdir / "nbd-server.conf"
    config.write_text(
        f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n    allowlist = true\n"
        f"[{export}]\n    exportname = {image}\n"
    )
    pidfile = workdir / "nbd-server.pid"
    subprocess.run(
        ["nbd-server", "-C", str(config), "-p", str(pidfile)], check=True, capture_output=True
    )
    try:
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nbd-server did not start") from None
                time.sleep(0.05)
        yield f"nbd://127.0.0.1:{port}/{export}"
    finally:
        for _ in range(100):
            if pidfile.exists():
                break
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 15)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)

"""Many ``backupd`` commands at the cost of one interpreter start: a runner that imports
the CLI once, then forks a fresh process per command and runs ``backupd.cli.main(argv)``
in it exactly as ``python -m backupd`` does (own process, own session, stdout and stderr
to files, stdin from /dev/null), with a timeout that kills the command's whole process
group.  Run it under ``strace -f`` and every command and every qemu it starts is traced.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
request: {"argv": [...], "out": path, "err": path, "timeout": s, "serve": bool}
reply:   {"pid": n, "code": n | null, "hung": bool, "served": bool}
A ``serve`` request waits for the first line on stdout (the URI), then sends SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _child(argv: list[str], out: str, err: str) -> None:
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["backupd", *argv]
    code = 1
    try:
        from backupd.cli import main

        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, deadline: float) -> int | None:
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def run(request: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    reply = _run(request)
    reply["seconds"] = round(time.monotonic() - started, 3)
    return reply


def _run(request: dict[str, Any]) -> dict[str, Any]:
    pid = os.fork()
    if pid == 0:
        _child(request["argv"], request["out"], request["err"])
    deadline = time.monotonic() + float(request["timeout"])
    served = False
    if request.get("serve"):
        out = Path(request["out"])
        while time.monotonic() < deadline:
            served = out.exists() and out.read_text().endswith("\n")
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return {
                    "pid": pid,
                    "code": os.waitstatus_to_exitcode(status),
                    "hung": False,
                    "served": served,
                }
            if served:
                os.kill(pid, signal.SIGTERM)
                break
            time.sleep(0.02)
    code = _wait(pid, deadline if not served else time.monotonic() + 15)
    if code is None:
        _kill(pid)
        return {"pid": pid, "code": None, "hung": True, "served": served}
    return {"pid": pid, "code": code, "hung": False, "served": served}


def main() -> None:
    import backupd.cli
    from backupd.commands import VERBS

    for verb in VERBS:  # import every verb's module once, before the forks
        backupd.cli.build_parser(verb)
    for line in sys.stdin:
        reply = run(json.loads(line))
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

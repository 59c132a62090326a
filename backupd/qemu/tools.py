"""Running qemu's command-line tools (qemu-img) as children of backupd that die with it.

A SIGKILLed backupd must not leave a qemu-img working on a repository file behind it
(the next command would find the file locked, or changing under it), so every child
asks the kernel for SIGKILL when its parent goes (``PR_SET_PDEATHSIG``).  A failure is
one line: the tool's last message.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import subprocess
from pathlib import Path

from backupd.errors import BackupdError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def qemu_img(*args: str, cwd: Path | None = None, pass_fds: tuple[int, ...] = ()) -> str:
    """``qemu-img ARGS...``; its standard output, or BackupdError with its last message
    (``pass_fds``: descriptors it inherits, e.g. a key file read as ``/dev/fd/N``)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        *args,
        cwd=cwd,
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise BackupdError(
            f"qemu-img {args[0]} failed: {lines[-1] if lines else f'exit {proc.returncode}'}"
        )
    return out.decode(errors="replace")

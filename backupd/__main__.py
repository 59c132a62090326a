"""``python -m backupd`` and the ``backupd`` command.

SIGTERM is turned into an exception like SIGINT's KeyboardInterrupt before anything else
is imported, so either signal, even during start-up, ends with one line and the
documented exit code (130 for SIGINT, 143 for SIGTERM) after the clean-up under way;
``backupd run`` installs its own handlers on top.  Once the outcome is known, both
signals are blocked and the process ends with exactly that code: a signal that arrives
while the interpreter shuts down cannot turn a finished run into a crash.
"""

import contextlib
import os
import signal
import sys
from types import FrameType

STOP = {signal.SIGINT, signal.SIGTERM}


class Terminated(BaseException):
    """SIGTERM arrived."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _exit(code: int) -> None:
    """Flush what was written and end the process with ``code`` (signals are blocked)."""
    import logging

    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            from backupd.cli import main

            code = main()
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
    except KeyboardInterrupt:
        print("backupd: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    except Terminated:
        print("backupd: terminated", file=sys.stderr)
        code = 128 + signal.SIGTERM
    _exit(code)


if __name__ == "__main__":
    entry()

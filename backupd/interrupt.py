"""SIGINT and SIGTERM for the verbs that run an event loop: a cancel of their work,
which then cleans up (thaws a guest, tears a view down, removes a half-written output),
and the documented exit code, 128 + the signal.

The signals stay blocked (backupd/__main__.py blocks them first thing) until the event
loop handles them: one that arrives in between waits and then cancels the work, instead
of breaking into the event loop's construction.  They are blocked again before the loop
closes (which would put their handlers back to "kill").
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

STOP = {signal.SIGINT, signal.SIGTERM}


class Interrupt:
    """The signal (SIGINT, SIGTERM) that cancelled the run, if any.

    The signals stay blocked (:meth:`blocked`) until the event loop handles them
    (:meth:`install`): one that arrives in between waits and then cancels the run, instead
    of breaking into the event loop's construction."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @staticmethod
    @contextlib.contextmanager
    def blocked() -> Iterator[None]:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def install(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if self.signal is None:  # the first stops the work; its clean-up then runs
                self.signal = sig  # to its end (a second signal changes nothing)
                task.cancel()

        for sig in STOP:
            loop.add_signal_handler(sig, on_signal, sig)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)

    @staticmethod
    def uninstall() -> None:
        """Block the signals again before the loop puts its handlers back to defaults."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it."""
        return 128 + (self.signal or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGINT).name


async def _interruptible(
    main: Callable[[Interrupt], Coroutine[Any, Any, int]], interrupt: Interrupt
) -> int:
    interrupt.install()
    try:
        return await main(interrupt)
    except asyncio.CancelledError:
        if interrupt.signal is None:
            raise
        return interrupt.exit_code
    finally:
        interrupt.uninstall()


def run_interruptible(main: Callable[[Interrupt], Coroutine[Any, Any, int]]) -> int:
    """``asyncio.run(main(interrupt))``: SIGINT/SIGTERM cancel it; 128 + the signal when
    one did (the work may also return that code itself, having said what it undid)."""
    interrupt = Interrupt()
    previous = signal.getsignal(signal.SIGTERM)  # the loop would leave SIGTERM on "kill"
    with Interrupt.blocked():
        try:
            code = asyncio.run(_interruptible(main, interrupt))
        finally:
            signal.signal(signal.SIGTERM, previous)
    return interrupt.exit_code if interrupt.signal else code

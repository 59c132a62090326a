"""The S3 client on an event loop of its own thread, callable from anywhere.

A repository answers both synchronous callers (``list``, ``status``, the chain walk and
the gate, which read a few small objects) and asynchronous ones (a backup's uploads,
``verify``'s reads, the NBD server that feeds qemu).  The aiobotocore client belongs to
one event loop; :class:`Bridge` runs that loop in a daemon thread, so:

- :meth:`Bridge.call` runs a coroutine there and waits for it from synchronous code
  (including code running on another event loop: that loop waits, the bridge's does not
  depend on it, so nothing deadlocks);
- :meth:`Bridge.run` awaits it from another event loop without blocking that loop;
  cancelling the caller cancels the coroutine.

Everything that talks to the store (uploads, ranged reads, the NBD server for qemu) runs
on the bridge's loop; callers hand it coroutines.  SIGINT and SIGTERM are blocked in the
thread, so they reach the main thread as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Bridge:
    """``Bridge(open_fn, close_fn)``: ``open_fn()`` runs on the loop at :meth:`start`
    (e.g. connect the client), ``close_fn()`` at :meth:`stop`."""

    def __init__(
        self,
        name: str,
        opening: Callable[[], Coroutine[Any, Any, None]] | None = None,
        closing: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.name = name
        self._opening = opening
        self._closing = closing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{self.name}: not started")
        return self._loop

    def in_loop(self) -> bool:
        """Whether the caller runs on the bridge's own loop."""
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread and its loop, then run ``opening`` (its error is raised
        here, and the thread is stopped again)."""
        with self._lock:
            if self._thread is not None:
                return
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def main() -> None:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

            self._loop = loop
            self._thread = threading.Thread(target=main, name=self.name, daemon=True)
            self._thread.start()
            ready.wait()
        if self._opening is not None:
            try:
                self.call(self._opening())
            except BaseException:
                self.stop()
                raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge's loop and return its result (synchronously)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError(f"{self.name}: a blocking call from the bridge's own loop")
        return self.submit(coro).result()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` run on the bridge's loop (directly when already on it)."""
        if self.in_loop():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        """Run ``closing``, stop the loop and wait for the thread (safe to call twice)."""
        with self._lock:
            thread, loop = self._thread, self._loop
            self._thread = None
        if thread is None or loop is None:
            return
        if self._closing is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._closing(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._loop = None

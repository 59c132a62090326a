"""run_to_completion: the work ends whatever happens to the caller, and the caller's
cancellation is never lost, not even when the work fails."""

from __future__ import annotations

import asyncio

import pytest

from backupd.shield import run_to_completion


async def _work(release: asyncio.Event, outcome: BaseException | None, done: list[str]) -> str:
    await release.wait()
    done.append("ended")
    if outcome is not None:
        raise outcome
    return "result"


async def _cancelled_while_waiting(
    outcome: BaseException | None,
) -> tuple[BaseException, list[str]]:
    release, done = asyncio.Event(), list[str]()
    task = asyncio.create_task(run_to_completion(_work(release, outcome, done)))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.01)
    task.cancel()  # a second signal
    await asyncio.sleep(0.01)
    assert not task.done() and done == []
    release.set()
    with pytest.raises(asyncio.CancelledError) as caught:
        await task
    return caught.value, done


async def test_the_work_ends_and_the_cancellation_follows() -> None:
    error, done = await _cancelled_while_waiting(None)
    assert done == ["ended"] and error.__cause__ is None


async def test_a_failed_work_does_not_swallow_the_cancellation() -> None:
    error, done = await _cancelled_while_waiting(OSError("thaw failed"))
    assert done == ["ended"] and isinstance(error.__cause__, OSError)


async def test_without_cancellation_result_and_error_pass_through() -> None:
    release = asyncio.Event()
    release.set()
    assert await run_to_completion(_work(release, None, [])) == "result"
    with pytest.raises(OSError, match="boom"):
        await run_to_completion(_work(release, OSError("boom"), []))

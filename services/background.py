"""The one way the bot runs work in the background: bounded, tracked, and never silent.

Listeners hand their slow part here (Slack's request returns at once), the issuer runs its
workers here, and the long-lived loops (reminders, the sweeper) too. A failure is logged with
what the task was (a case id, an instance), never lost; shutdown waits for what is in flight.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class Background:
    def __init__(self, limit: int | None = None, name: str = "background work"):
        self.limit = limit  # at most this many run at once (None: no bound, for long-lived loops)
        self.name = name
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro, what: str | None = None) -> asyncio.Task:
        if self.limit is not None and self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)

        async def bounded():
            try:
                if self._slots is None:
                    return await coro
                async with self._slots:
                    return await coro
            finally:
                coro.close()  # cancelled while waiting for a slot: its coroutine never ran (a no-op otherwise)
        task = asyncio.create_task(bounded())
        task.what = what or self.name
        task.work = coro  # closed when the task ends: cancelled before it first ran, its finally never runs
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        task.work.close()  # a no-op once it ran; else "coroutine ... was never awaited"
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.what, exc_info=task.exception())

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float) -> None:
        """Wait for what is in flight, up to timeout_s; the rest is left (the sweeper resumes issuing)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

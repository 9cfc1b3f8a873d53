"""services/background.py: work cancelled before it first ran (a process stopping, a test's crash
point) is closed, not left for the garbage collector to call "never awaited"."""
import asyncio
import gc
import warnings

from services.background import Background


def test_work_cancelled_before_it_ran_is_closed_quietly_and_work_that_ran_returns():
    async def work(n):
        await asyncio.sleep(0)
        return n

    async def go():
        bg = Background(limit=1)
        never = bg.spawn(work(1), "never ran")
        never.cancel()  # before its first step
        waited = bg.spawn(work(2), "waited for a slot")
        ran = await waited
        await asyncio.sleep(0)
        return never.cancelled(), ran, bg.running

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cancelled, ran, running = asyncio.run(go())
        gc.collect()
    assert cancelled and ran == 2 and running == 0
    assert not [w for w in seen if "never awaited" in str(w.message)], [str(w.message) for w in seen]

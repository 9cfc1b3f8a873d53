"""Load generator for bench/slack_bench.py: fires N signed /billing-check commands at once from its
own process (asyncio + aiohttp, one warm connection each) and prints each ack time as JSON."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlencode

import aiohttp

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from tests.slack_harness import sign  # noqa: E402


async def main(url: str, n: int, text: str | None = None) -> None:
    bodies = [urlencode({"command": "/billing-check", "text": text or f"i-load{i:03d} 2026-10", "user_id": "U_AGENT",
                         "channel_id": "C_LOAD", "team_id": "T1", "trigger_id": "t"}) for i in range(n)]
    connector = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
        # open the connections first, so the burst measures the bot and not TCP handshakes
        async def warm():
            async with session.get("/healthz") as r:
                await r.read()
        await asyncio.gather(*(warm() for _ in range(n)))
        signed = [(b, sign(b)) for b in bodies]

        async def one(body: str, headers: dict) -> tuple[float, int]:
            t0 = time.perf_counter()
            async with session.post("/slack/events", data=body, headers=headers) as r:
                await r.read()
                return time.perf_counter() - t0, r.status
        results = await asyncio.gather(*(one(b, h) for b, h in signed))
    print(json.dumps({"acks": [r[0] for r in results], "statuses": [r[1] for r in results]}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))

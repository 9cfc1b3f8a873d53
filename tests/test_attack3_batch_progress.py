"""Attacks on a batch's one progress message (SPEC 5.3): Slack failing while it is posted, two
replicas' loops updating it at once, and a batch finished only when nothing can change."""
import asyncio
from types import SimpleNamespace

from bot import remediation_flow

from .test_remediation_batch import World, seed_customers


class Slack:
    def __init__(self, fail_posts=0):
        self.fail_posts = fail_posts
        self.posts, self.updates = [], []

    async def chat_postMessage(self, **kw):
        await asyncio.sleep(0.02)
        if self.fail_posts:
            self.fail_posts -= 1
            raise ConnectionError("Slack is down")
        self.posts.append(kw)
        return {"ok": True, "channel": kw["channel"], "ts": f"17000000.{len(self.posts):06d}"}

    async def chat_update(self, **kw):
        await asyncio.sleep(0.02)
        self.updates.append(kw)
        return {"ok": True}


def test_slack_failing_then_two_replicas_post_the_progress_once(db, db_url, polar):
    seed_customers(db, polar, n=3, instances_each=1)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            slack = Slack(fail_posts=1)
            ca, cb = SimpleNamespace(remediation=a.remediation, client=slack), \
                SimpleNamespace(remediation=b.remediation, client=slack)
            batch, _ = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            await a.remediation.approve(batch["id"], "U_LEAD")
            await a.issuer.drain(30)
            try:
                await remediation_flow.update_progress(ca, batch["id"])
                raise AssertionError("Slack's failure was swallowed")
            except ConnectionError:
                pass
            after_failure = await a.batches.get(batch["id"])
            told = await asyncio.gather(remediation_flow.update_progress(ca, batch["id"]),
                                        remediation_flow.update_progress(cb, batch["id"]))
            again = await asyncio.gather(remediation_flow.progress_once(ca), remediation_flow.progress_once(cb))
            return slack, after_failure, told, again, await a.batches.get(batch["id"]), await a.batches.unfinished()

    slack, after_failure, told, again, batch, unfinished = asyncio.run(go())
    assert after_failure["progress_text"] is None and not after_failure["finished"]
    assert sorted(told) == [False, True] and again == [0, 0]
    assert len(slack.posts) == 1 and slack.updates == []
    assert "3 of 3 issued" in slack.posts[0]["text"]
    assert batch["progress_ts"] == "17000000.000001" and batch["finished"]
    assert unfinished == []

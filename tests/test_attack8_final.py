"""Attack 8 (final review of the bulk checks, the issuing workers' own pool and the background
closing): an instance check and a customer check over chunked reads (CHUNK=1) then both
approved; two replicas approving one batch with both issuers running; a crash during a batch's
opening then resume(); Polar 500s right after an approval; an approver one level too low; an
old superseded batch's Approve. Each asserts money properties: no billed second held twice,
each customer credited exactly what it is owed, once."""
import asyncio

import pytest

import services.multi_check as multi_check
from services.cases import CheckRequest

from .seed import record
from .test_attack3_batch_authority import seed_big
from .test_attack3_batch_races import double_held, refunded_by_customer
from .test_remediation_batch import World, rows, seed_customers

OWED = 2 * 208 + 399  # per customer of seed_customers(instances_each=2): duplicates + the wrong-tier hour


def corrections_per_customer(db_url):
    return rows(db_url, "SELECT customer_id, count(*) FROM billing_corrections GROUP BY 1 ORDER BY 1")


async def approve_everything_pending(w, user="U_VP", rounds=4):
    for _ in range(rounds):
        pending = [r[0] for r in rows(w.db_url, "SELECT id FROM billing_bot.cases WHERE state = 'pending'")]
        if not pending:
            return
        for cid in pending:
            out = await w.service.approve(cid, user)
            assert out.status in ("done", "changed", "refused"), out
        await w.issuer.drain(30)


def test_1_instance_and_customer_checks_at_once_over_chunked_reads_credit_each_second_once(
        db, db_url, polar, monkeypatch):
    monkeypatch.setattr(multi_check, "CHUNK", 1)
    seed_customers(db, polar, n=3, instances_each=2)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            jobs = []
            for c in range(3):
                jobs += [a.service.open(CheckRequest(f"i-{c:02d}-0", ["2026-10"], "U1")),
                         b.service.open_customer(f"c-{c:02d}", CheckRequest("", ["2026-10"], "U1")),
                         a.service.open(CheckRequest(f"i-{c:02d}-1", ["2026-10"], "U1"))]
            outs = await asyncio.gather(*jobs, return_exceptions=True)
            assert not [o for o in outs if isinstance(o, BaseException)], outs
            assert double_held(db_url) == []
            # both cases approved at the same moment (two replicas)
            pending = [r[0] for r in rows(db_url, "SELECT id FROM billing_bot.cases WHERE state = 'pending'")]
            await asyncio.gather(*[(a if k % 2 else b).service.approve(cid, "U_VP") for k, cid in enumerate(pending)])
            await asyncio.gather(a.issuer.drain(30), b.issuer.drain(30))
            await approve_everything_pending(a)
            await a.issuer.resume_unfinished()
            await a.issuer.drain(30)

    asyncio.run(go())
    assert double_held(db_url) == []
    # every billed second credited once: exactly what each customer is owed, never more
    assert refunded_by_customer(polar) == {f"c-{c:02d}": OWED for c in range(3)}
    issued = dict(rows(db_url, "SELECT customer_id, sum(issued_cents)::int FROM billing_bot.cases"
                               " WHERE state = 'issued' GROUP BY 1"))
    assert issued == {f"c-{c:02d}": OWED for c in range(3)}


def test_2_two_replicas_approving_one_batch_at_once_with_both_issuers_refund_once(db, db_url, polar, monkeypatch):
    monkeypatch.setattr(multi_check, "CHUNK", 1)
    seed_customers(db, polar, n=5, instances_each=2)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            batch, _ = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")

            async def sweeper(w):
                for _ in range(20):
                    await w.remediation.resume()
                    await w.issuer.resume_unfinished()
                    await asyncio.sleep(0.01)
            outs = await asyncio.gather(a.remediation.approve(batch["id"], "U_LEAD"),
                                        b.remediation.approve(batch["id"], "U_LEAD"), sweeper(a), sweeper(b))
            await asyncio.gather(a.issuer.drain(30), b.issuer.drain(30))
            await b.remediation.resume()
            await b.issuer.resume_unfinished()
            await b.issuer.drain(30)
            return outs[:2], await a.remediation.progress(batch["id"])

    outs, progress = asyncio.run(go())
    assert sorted(o.status for o in outs) == ["done", "refused"]
    assert progress.issued == 5 and progress.issued_cents == 5 * 416
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 416 for i in range(5)}
    assert len(polar.refunds) == 5
    assert corrections_per_customer(db_url) == [(f"c-{i:02d}", 1) for i in range(5)]
    assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 5
    assert double_held(db_url) == []


@pytest.mark.parametrize("opened_before_crash", [1, 3])
def test_3_a_cancelled_task_during_a_batch_opening_is_resumed_and_credits_once(db, db_url, polar,
                                                                                 opened_before_crash):
    seed_customers(db, polar, n=5, instances_each=1)

    async def crash():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            real, calls, done, gate = w.remediation._open_one, 0, 0, asyncio.Event()

            async def hangs_after(*args, **kw):  # openings run a few at once: count the finished ones
                nonlocal calls, done
                calls += 1
                if calls > opened_before_crash:
                    while done < opened_before_crash:
                        await asyncio.sleep(0.005)
                    gate.set()
                    await asyncio.sleep(3600)  # the process dies here: the task is cancelled
                out = await real(*args, **kw)
                done += 1
                return out
            w.remediation._open_one = hangs_after
            task = asyncio.ensure_future(w.remediation.approve(batch["id"], "U_LEAD"))
            await asyncio.wait_for(gate.wait(), 10)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await w.issuer.drain(30)  # the already opened cases' refunds may or may not go out
            opened = rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0]
            assert opened == opened_before_crash  # the crash really fell inside the opening
            return batch["id"]

    async def restart(batch_id):
        async with World(db_url, polar) as w:
            w.issuer.in_flight_window_s = 0.2
            await asyncio.sleep(0.3)
            for _ in range(3):
                await w.remediation.resume()
                await w.issuer.resume_unfinished()
                await w.issuer.drain(30)
            assert await w.remediation.resume() == []
            return await w.batches.get(batch_id), await w.remediation.progress(batch_id)

    batch_id = asyncio.run(crash())
    batch, progress = asyncio.run(restart(batch_id))
    assert batch["state"] == "approved" and batch["cases_opened"]
    assert progress.issued == 5 and progress.done
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 208 for i in range(5)}
    assert len(polar.refunds) == 5
    assert corrections_per_customer(db_url) == [(f"c-{i:02d}", 1) for i in range(5)]
    assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 5


def test_4_polar_500s_right_after_an_approval_end_with_one_refund_each(db, db_url, polar):
    seed_customers(db, polar, n=3, instances_each=2)
    polar.fail("POST", "/v1/refunds/", status=500, times=4)
    polar.fail("POST", "/v1/refunds/", kind="drop_after", times=1)  # one POST lands but its answer is lost
    polar.fail("GET", "/v1/refunds/", status=500, times=2)

    async def go():
        async with World(db_url, polar) as w:
            w.issuer.in_flight_window_s = 0.2
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            assert (await w.remediation.approve(batch["id"], "U_LEAD")).ok
            await w.issuer.drain(30)
            for _ in range(4):
                await asyncio.sleep(0.25)
                await w.issuer.resume_unfinished()
                await w.issuer.drain(30)
                p = await w.remediation.progress(batch["id"])
                for f in p.failed:
                    await w.service.retry(f.case_id, "U_LEAD", f.failures)
                await w.issuer.drain(30)
            return await w.remediation.progress(batch["id"])

    progress = asyncio.run(go())
    assert polar.faults == [] or all(f.times == 0 for f in polar.faults)  # the 500s and the drop were hit
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 416 for i in range(3)}, progress
    assert len(polar.refunds) == 3
    assert progress.issued == 3
    assert corrections_per_customer(db_url) == [(f"c-{i:02d}", 1) for i in range(3)]


def test_5_an_approver_one_level_too_low_is_refused_and_nothing_moves(db, db_url, polar):
    seed_big(db, polar, n=2, charge="30.00")  # $60.00: level 2

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            batch, plan = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            outs = await asyncio.gather(a.remediation.approve(batch["id"], "U1"),
                                        b.remediation.approve(batch["id"], "U1"),
                                        b.remediation.reject(batch["id"], "U1", "not a real defect at all"))
            await asyncio.gather(a.issuer.drain(30), b.issuer.drain(30))
            await a.remediation.resume()
            await a.issuer.resume_unfinished()
            await a.issuer.drain(30)
            return batch, plan, outs, await a.batches.get(batch["id"])

    batch, plan, outs, after = asyncio.run(go())
    assert batch["required_level"] == 2 and plan.total_cents == 6000
    assert all(o.status == "refused" and o.needed_level == 2 for o in outs), outs
    assert after["state"] == "planned" and not after["cases_opened"]
    assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 0
    assert rows(db_url, "SELECT count(*) FROM billing_corrections")[0][0] == 0
    assert polar.refunds == []


def test_6_an_old_superseded_batchs_approve_is_refused(db, db_url, polar):
    rid = seed_customers(db, polar, n=3, instances_each=1)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            old, _ = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            record(db, rid, "i-01-0", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-01", customer="c-01")
            changed = await a.remediation.approve(old["id"], "U_LEAD")
            assert changed.status == "changed"
            new_id = changed.batch["id"]
            # the old message's Approve and the new one's, clicked at once on two replicas
            stale, fresh = await asyncio.gather(b.remediation.approve(old["id"], "U_VP"),
                                                a.remediation.approve(new_id, "U_LEAD"))
            late = await b.remediation.approve(old["id"], "U_VP")
            await asyncio.gather(a.issuer.drain(30), b.issuer.drain(30))
            await b.remediation.resume()
            await b.issuer.drain(30)
            return stale, fresh, late, await a.batches.get(old["id"]), new_id

    stale, fresh, late, old, new_id = asyncio.run(go())
    assert stale.status == "refused" and late.status == "refused"
    assert old["state"] == "superseded" and not old["cases_opened"]
    assert fresh.ok
    assert rows(db_url, "SELECT DISTINCT batch_id FROM billing_bot.cases") == [(new_id,)]
    assert refunded_by_customer(polar) == {"c-00": 208, "c-01": 416, "c-02": 208}
    assert corrections_per_customer(db_url) == [(f"c-{i:02d}", 1) for i in range(3)]
    assert double_held(db_url) == []


@pytest.mark.parametrize("after_s", [0.0, 0.1])
def test_3b_the_process_dying_with_queued_issuing_work_never_started_credits_once(db, db_url, polar, after_s):
    """One issuing worker: most cases' issuing is queued, never started, when every task is
    cancelled (Background closes never-started work). The restart must issue each once."""
    seed_customers(db, polar, n=6, instances_each=1)

    async def crash():
        async with World(db_url, polar) as w:
            w.issuer.workers = 1
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            assert (await w.remediation.approve(batch["id"], "U_LEAD")).ok
            await asyncio.sleep(after_s)
            tasks = list(w.issuer.background._tasks) if w.issuer.background else []
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            w.issuer.background = None
            return batch["id"], len(polar.refunds)

    async def restart(batch_id):
        async with World(db_url, polar) as w:
            w.issuer.in_flight_window_s = 0.2
            await asyncio.sleep(0.3)
            for _ in range(3):
                await w.remediation.resume()
                await w.issuer.resume_unfinished()
                await w.issuer.drain(30)
            return await w.remediation.progress(batch_id)

    batch_id, at_crash = asyncio.run(crash())
    assert at_crash < 6 or after_s > 0  # with no delay the crash leaves work behind
    progress = asyncio.run(restart(batch_id))
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 208 for i in range(6)}, (at_crash, progress)
    assert len(polar.refunds) == 6 and progress.issued == 6
    assert corrections_per_customer(db_url) == [(f"c-{i:02d}", 1) for i in range(6)]

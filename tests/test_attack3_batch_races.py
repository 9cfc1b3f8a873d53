"""Attacks on remediation batches and cases over several instances (issue 16): concurrent
approvals, two replicas, two plans of the same defect, and an instance's own case racing a batch
for the same billed seconds. Each asserts the correct behaviour: no billed second held by two
holding cases, each customer credited once."""
import asyncio
from datetime import datetime, timezone

from services.case_evidence import Scope
from services.cases import CheckRequest

from .seed import record
from .test_remediation_batch import World, rows, seed_customers

HOLDING = "('pending','approved','issuing','failed','issued')"


def double_held(db_url):
    """Pairs of holding cases that hold the same billed second (or both an extra event) of a record."""
    return rows(db_url, f"""
        SELECT a.case_id, b.case_id, a.record_id FROM billing_bot.case_pieces a
        JOIN billing_bot.case_pieces b ON a.record_id = b.record_id AND a.case_id < b.case_id
        JOIN billing_bot.cases ca ON ca.id = a.case_id AND ca.state IN {HOLDING}
        JOIN billing_bot.cases cb ON cb.id = b.case_id AND cb.state IN {HOLDING}
        WHERE (a.extra_events = 0 AND b.extra_events = 0
               AND int8range(a.start_us, a.end_us) && int8range(b.start_us, b.end_us))
           OR (a.extra_events > 0 AND b.extra_events > 0)""")


def refunded_by_customer(polar):
    by_order = {o["id"]: o["_external_customer_id"] for o in polar.orders}
    out: dict[str, int] = {}
    for r in polar.refunds:
        out[by_order[r["order_id"]]] = out.get(by_order[r["order_id"]], 0) + r["amount"]
    return out


def test_double_click_and_a_second_approver_at_once_give_one_approval(db, db_url, polar):
    seed_customers(db, polar, n=3, instances_each=2)

    async def go():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            outs = await asyncio.gather(w.remediation.approve(batch["id"], "U_LEAD"),
                                        w.remediation.approve(batch["id"], "U_LEAD"),
                                        w.remediation.approve(batch["id"], "U_VP"))
            await w.issuer.drain(30)
            return outs, await w.remediation.progress(batch["id"])

    outs, progress = asyncio.run(go())
    assert sorted(o.status for o in outs) == ["done", "refused", "refused"]
    assert progress.issued == 3 and progress.issued_cents == 3 * 416
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 416 for i in range(3)}
    assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 3
    assert double_held(db_url) == []


def test_two_replicas_approving_and_resuming_at_once_credit_each_customer_once(db, db_url, polar):
    """Two processes (separate pools, separate issuers): one approves, the other's sweeper resumes
    the batch while the first is still opening it (the approver does not wait for the batch lock)."""
    seed_customers(db, polar, n=6, instances_each=1)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            batch, _ = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")

            async def sweeper():
                for _ in range(40):
                    await b.remediation.resume()
                    await asyncio.sleep(0.01)
            out, _ = await asyncio.gather(a.remediation.approve(batch["id"], "U_LEAD"), sweeper())
            await asyncio.gather(a.issuer.drain(30), b.issuer.drain(30))
            await b.issuer.resume_unfinished()
            await b.issuer.drain(30)
            return out, await a.remediation.progress(batch["id"]), await a.batches.get(batch["id"])

    out, progress, batch = asyncio.run(go())
    assert out.ok
    assert batch["cases_opened"]
    assert progress.issued == 6 and progress.issued_cents == 6 * 208
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 208 for i in range(6)}
    assert rows(db_url, "SELECT customer_id, count(*) FROM billing_corrections GROUP BY 1 HAVING count(*) > 1") == []
    assert double_held(db_url) == []


def test_two_plans_of_the_same_defect_approved_at_once_credit_each_second_once(db, db_url, polar):
    """Two people propose the same remediation (two batches with the same fingerprint); two
    approvers approve both at once. Each batch's re-computation may see the other's cases not yet
    opened: only the pieces under the locks keep a second from being credited twice."""
    seed_customers(db, polar, n=4, instances_each=2)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            one, p1 = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            two, p2 = await b.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            assert p1.fingerprint == p2.fingerprint
            outs = await asyncio.gather(a.remediation.approve(one["id"], "U_LEAD"),
                                        b.remediation.approve(two["id"], "U_VP"))
            await asyncio.gather(a.issuer.drain(30), b.issuer.drain(30))
            return outs

    outs = asyncio.run(go())
    assert any(o.ok for o in outs)
    assert refunded_by_customer(polar) == {f"c-{i:02d}": 416 for i in range(4)}
    assert double_held(db_url) == []
    issued = rows(db_url, "SELECT customer_id, sum(issued_cents) FROM billing_bot.cases WHERE state = 'issued'"
                          " GROUP BY 1 ORDER BY 1")
    assert issued == [(f"c-{i:02d}", 416) for i in range(4)]


def test_an_instance_check_racing_the_batch_never_holds_a_second_twice(db, db_url, polar):
    """While the batch is approved and its cases opened, support checks single instances and a
    customer of the plan: whoever claims the time first holds it, the other leaves it out."""
    seed_customers(db, polar, n=4, instances_each=2)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            batch, _ = await a.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")

            async def support():
                await asyncio.sleep(0.05)
                outs = []
                for iid in ("i-01-0", "i-02-1", "i-03-0"):
                    outs.append(await b.service.open(CheckRequest(iid, ["2026-10"], "U1")))
                outs += await b.service.open_customer("c-00", CheckRequest("", ["2026-10"], "U1"))
                return outs
            out, opened = await asyncio.gather(a.remediation.approve(batch["id"], "U_LEAD"), support())
            return out, opened

    out, opened = asyncio.run(go())
    assert double_held(db_url) == []
    # the duplicate hour of each instance is credited (or held) by exactly one case
    dup = rows(db_url, f"""SELECT r.instance_id, count(DISTINCT p.case_id) FROM billing_bot.case_pieces p
                           JOIN billing_bot.cases c ON c.id = p.case_id AND c.state IN {HOLDING}
                           JOIN billing_records r ON r.id = p.record_id
                           WHERE p.kind = 'duplicate_charge' GROUP BY 1 ORDER BY 1""")
    assert dup == [(f"i-{c:02d}-{k}", 1) for c in range(4) for k in range(2)]


def test_a_customer_case_then_an_instance_check_shows_the_customer_case(db, db_url, polar):
    seed_customers(db, polar, n=1, instances_each=2)

    async def go():
        async with World(db_url, polar) as w:
            first = (await w.service.open_customer("c-00", CheckRequest("", ["2026-10"], "U1")))[0]
            single = await w.service.open(CheckRequest("i-00-1", ["2026-10"], "U1"))
            plan = await w.remediation.plan("duplicate_charge", "2026-10")
            return first, single, plan

    first, single, plan = asyncio.run(go())
    assert first.ok and first.case.instances == ("i-00-0", "i-00-1")
    assert single.status == "existing" and single.case.id == first.case.id
    assert plan.customers == ()  # the customer's case holds the time: the plan leaves it out
    assert {h[1] for h in plan.held} == {"i-00-0", "i-00-1"}


def test_an_instance_case_then_a_customer_check_credits_only_the_rest(db, db_url, polar):
    seed_customers(db, polar, n=1, instances_each=3)

    async def go():
        async with World(db_url, polar) as w:
            single = await w.service.open(CheckRequest("i-00-1", ["2026-10"], "U1"))
            cust = (await w.service.open_customer("c-00", CheckRequest("", ["2026-10"], "U1")))[0]
            again = (await w.service.open_customer("c-00", CheckRequest("", ["2026-10"], "U1")))[0]
            return single, cust, again

    single, cust, again = asyncio.run(go())
    assert single.ok and single.case.credit_cents == 208
    # the customer's case does not credit i-00-1's duplicate hour a second time
    assert cust.status in ("done", "existing")
    if cust.status == "done":
        assert cust.case.credit_cents == 2 * 208 + 399
    assert again.status == "existing"
    assert double_held(db_url) == []


def test_a_case_opened_between_the_plan_and_its_approval_supersedes_the_plan(db, db_url, polar):
    seed_customers(db, polar, n=3, instances_each=1)

    async def go():
        async with World(db_url, polar) as w:
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            mine = await w.service.open(CheckRequest("i-01-0", ["2026-10"], "U1"))
            out = await w.remediation.approve(batch["id"], "U_LEAD")
            late = await w.remediation.approve(batch["id"], "U_VP")  # the old plan's button again
            return plan, mine, out, late

    plan, mine, out, late = asyncio.run(go())
    assert out.status == "changed"
    assert [c.customer_id for c in out.plan.customers] == ["c-00", "c-02"]
    assert late.status == "refused" and "replaced" in late.reason
    assert rows(db_url, "SELECT count(*) FROM billing_bot.cases WHERE batch_id IS NOT NULL")[0][0] == 0
    assert polar.refunds == []


def test_a_rejected_batch_cannot_be_approved_afterwards_nor_at_once(db, db_url, polar):
    seed_customers(db, polar, n=2, instances_each=1)

    async def go():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            rej, app = await asyncio.gather(w.remediation.reject(batch["id"], "U_LEAD", "not a defect"),
                                            w.remediation.approve(batch["id"], "U_VP"))
            later = await w.remediation.approve(batch["id"], "U_VP")
            await w.issuer.drain(30)
            return rej, app, later, await w.batches.get(batch["id"])

    rej, app, later, batch = asyncio.run(go())
    assert [rej.ok, app.ok].count(True) == 1
    assert later.status == "refused"
    if rej.ok:
        assert batch["state"] == "rejected" and polar.refunds == []
        assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 0
    else:
        assert batch["state"] == "approved" and len(polar.refunds) == 2

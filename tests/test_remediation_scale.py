"""The short version of bench/remediation_bench.py: a remediation batch of 200 instances over 40
customers against our Polar answering after 5 ms. Every customer is credited exactly once (one
refund, one billing_corrections row) and Polar is called exactly as often as the batch needs."""
import asyncio
import time

from bench.remediation_bench import count_calls, seed_controlplane, seed_polar

from .test_remediation_batch import World, rows

INSTANCES, CUSTOMERS, AFFECTED = 200, 40, 2  # 5 instances a customer, 2 of them with a duplicated hour


def test_a_batch_of_forty_customers_is_issued_once_each_with_the_calls_it_needs(db, db_url, polar):
    dups = seed_controlplane(db, INSTANCES, CUSTOMERS, AFFECTED)
    assert dups == CUSTOMERS * AFFECTED
    seed_polar(polar, CUSTOMERS)
    polar.server.latency_s = 0.005

    async def go():
        async with World(db_url, polar) as w:
            t0 = time.perf_counter()
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            plan_s = time.perf_counter() - t0
            assert len(plan.customers) == CUSTOMERS and plan.total_cents == CUSTOMERS * AFFECTED * 208
            planned = count_calls(polar.server.requests)
            out = await w.remediation.approve(batch["id"], "U_LEAD")
            assert out.ok, out
            await w.issuer.drain(60)
            swept = await w.issuer.resume_unfinished()
            return batch, plan_s, planned, swept, await w.remediation.progress(batch["id"])

    batch, plan_s, planned, swept, progress = asyncio.run(go())
    assert plan_s < 10
    # the World's checks do not read Polar (no client in its Investigator): the plan calls nothing
    assert planned == {}
    assert swept == [] and progress.issued == CUSTOMERS and progress.done
    refunds = list(polar.refunds)
    per_order = {}
    for r in refunds:
        per_order[r["order_id"]] = per_order.get(r["order_id"], 0) + 1
    assert sorted(per_order.values()) == [1] * CUSTOMERS  # one refund per customer's order, none twice
    assert sorted(r["amount"] for r in refunds) == [AFFECTED * 208] * CUSTOMERS
    assert len({r["metadata"]["case_id"] for r in refunds}) == CUSTOMERS
    corr = rows(db_url, "SELECT customer_id, count(*) FROM billing_corrections GROUP BY 1 ORDER BY 1")
    assert len(corr) == CUSTOMERS and all(n == 1 for _, n in corr)
    # What the batch needs from Polar, per customer's case (services/issuing.py, _refunds):
    # - GET /v1/orders/ once: which order invoiced October and what it can still refund (one page);
    # - GET /v1/refunds/?order_id= once: the read-back before the POST (_refund_once reads the
    #   order's refunds back before every POST, a fresh intent's first included: a refund of the
    #   case Polar holds without an outbox row, after a failover lost the last commits, counts as
    #   made; tests/test_attack4_fresh_intent.py);
    # - POST /v1/refunds/ once.
    # Nothing else: no events (the method is refund), no customer lookup (the Recorder writes no
    # letter; the served bot's notifier takes the address from the case's report, which a check
    # reading Polar fills, or else looks the customer up once per case: bot/app.py). 3 calls a
    # customer, 120 in all. The plan itself calls nothing here; with Polar configured each
    # instance's check reads its usage events, and each customer's check its customer and orders once.
    assert count_calls(polar.server.requests) == {
        "GET /v1/orders/": CUSTOMERS, "GET /v1/refunds/?order_id": CUSTOMERS, "POST /v1/refunds/": CUSTOMERS}

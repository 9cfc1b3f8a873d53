"""Attacks on the remainder case (services/cases.py offer_remainder): it skips the evidence check."""
import asyncio

from .test_issuing import World, orders, seed


def run(coro):
    return asyncio.run(coro)


def test_a_remainder_is_not_issued_on_evidence_that_changed_after_its_parent(db, db_url, polar):
    """SPEC 2.2: at approval and again just before any money moves, the evidence the case was built
    on must be unchanged, else the case is checked again. A capped refund (500 of 1,028 cents) leaves
    a 528-cent remainder case. The control plane then removes the duplicate record #4 (the bulk of
    October's credit). The remainder is still approved and issued as 528 cents of invoice credit:
    verify_before_money returns None for children and _decide skips the check when parent_case_id
    is set, so nothing ever compares the evidence again."""
    seed(db)
    orders(polar, oct_=1500, oct_refunded=1000)  # the order can take 500 of 1,028 cents

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            parent = await w.issuer.issue(case.id)
            child = await w.cases.get(parent.id + 1)
            db.execute("DELETE FROM billing_records WHERE id = 4")
            fresh = await w.service.investigator.check("i-7f3a", ["2026-10"], exclude_case=parent.id)
            out = await w.service.approve(child.id, "U_LEAD")
            issued = await w.issuer.issue(child.id) if out.ok else None
            return parent, child, fresh.as_json()["credit_cents"], out, issued

    parent, child, now_cents, out, issued = run(go())
    assert parent.remainder_cents == 528 and child.credit_cents == 528
    paid = sum(-e["metadata"]["hours"] for e in polar.events if e["metadata"].get("case_id") == str(child.id))
    assert not (out.ok and issued is not None and issued.issued_cents == 528), (
        f"the remainder was approved and issued as {issued.issued_cents if issued else None} cents of invoice "
        f"credit ({paid:.4f} compensating hours) although October's evidence changed after the parent: a check "
        f"now finds {now_cents} cents for October in all, of which the parent already refunded 500")


def test_a_remainder_is_offered_even_if_the_worker_dies_after_the_parent_is_issued(db, db_url, polar):
    """SPEC 4: the remainder a capped refund left is offered as invoice credit. offer_remainder runs
    only in the worker that finalized the parent, right after finish_issued commits. A worker killed
    between the two (or offer_remainder hitting a database blip) leaves the parent `issued`, not
    notified; the sweeper resumes it and only announces it (`_issue_locked`: state issued ->
    _announce), so the 528-cent remainder is never offered: no case, nothing to approve."""
    seed(db)
    orders(polar, oct_=1500, oct_refunded=1000)  # the order can take 500 of 1,028 cents

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            claimed = await w.service.start_issuing(case)
            progress = await w.issuer._refunds(claimed, await w.issuer._settled_issuances(claimed))
            parent = await w.issuer._finalize(claimed, progress)
            # killed here, before offer_remainder; the sweeper resumes the unannounced case
            resumed = await w.issuer.resume_unfinished()
            after = await w.issuer.issue(case.id)
            child = await w.cases.get(parent.id + 1)
            return parent, resumed, after, child, w.rec

    parent, resumed, after, child, rec = run(go())
    assert parent.state == "issued" and parent.remainder_cents == 528
    assert parent.id in resumed and after.notified
    assert child is not None and child.parent_case_id == parent.id, (
        "the parent was resumed and announced, but its 528-cent remainder was never offered "
        f"(remainder offers told: {rec.remainders})")

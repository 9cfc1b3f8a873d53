"""What a check could judge, from what its sources answered (SPEC 5 `coverage`). Pure.

The report must never say all is well when it could not tell. Each finding kind of SPEC 2.2 is
judged from particular evidence; when that evidence is missing, the kind is named with the reason:

| evidence missing                    | kinds not fully judged                                        |
|-------------------------------------|---------------------------------------------------------------|
| Polar usage events                  | duplicate_charge (extra metering events; the database part is judged) |
| Kubernetes instance pods            | stuck_instance (pod terminated/deleted), wrong_tier (pod tier label, the first source of the true tier) |
| Kubernetes control-plane logs       | stuck_instance (Stopping/Reaping/Pausing..Resuming lines); wrong_tier only when no pod label decided the tier (the Creating line is the second source) |
| true tier not on the rate card      | wrong_tier                                                    |
| stuck_instance not fully judged     | each of throttle_continuous, throttle_daily, wrong_tier that has a finding: steps 3-5 see only the time step 2 left, so stuck time not seen may sit inside them |

A later kind without a finding stays judged when stuck_instance is not: more stuck time only removes
pieces before steps 3-5, and removing time never lengthens a run, never adds time after the daily
moment T (the org's totals come from the database) and never adds a piece to price, so "none" holds.
The database part of duplicate_charge reads only the database, which a check cannot run without.
No billing records in the checked periods is its own state: there is nothing to judge.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .model import KINDS

COMPLETE, PARTIAL, NO_RECORDS = "complete", "partial", "no_records"
AFFECTED_BY_STUCK = ("throttle_continuous", "throttle_daily", "wrong_tier")


@dataclass(frozen=True)
class Coverage:
    state: str
    kinds: tuple[str, ...] = ()  # not fully judged, in SPEC 2.2 order
    why: tuple[str, ...] = ()  # one sentence per (kind, reason), each starting with the kind

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    def as_json(self) -> dict:
        return {"state": self.state, "kinds": list(self.kinds), "why": list(self.why)}


@dataclass(frozen=True)
class Evidence:
    """What a check read. A problem is None when that evidence was read, else why it was not."""

    periods: tuple[str, ...]
    records_in_periods: int
    pods_problem: str | None
    logs_problem: str | None
    polar_problem: str | None
    tier_from_pod: bool  # the pods were read and one carries a tier label
    true_tier: str
    tier_on_card: bool
    finding_kinds: frozenset[str] = field(default_factory=frozenset)


def coverage(ev: Evidence) -> Coverage:
    if ev.records_in_periods == 0:
        return Coverage(NO_RECORDS, (), (f"no billing records in {', '.join(ev.periods)}: there is no charge to judge",))
    gaps: list[tuple[str, str]] = []
    if ev.polar_problem is not None:
        gaps.append(("duplicate_charge", f"extra metering events in Polar not read (polar {ev.polar_problem}); "
                                         "duplicate records in the database were judged"))
    if ev.pods_problem is not None:
        gaps.append(("stuck_instance", f"pod termination and deletion not seen (kubernetes {ev.pods_problem})"))
    if ev.logs_problem is not None:
        gaps.append(("stuck_instance", f"control-plane Stopping/Reaping/Pausing/Resuming lines not read "
                                       f"(kubernetes {ev.logs_problem}); nor the Failed to pause/delete lines "
                                       "that make a case systematic"))
    if ev.pods_problem is not None:
        gaps.append(("wrong_tier", f"the pod's tier label (the true tier's first source) not read "
                                   f"(kubernetes {ev.pods_problem}); the tier used, {ev.true_tier}, may be wrong"))
    elif ev.logs_problem is not None and not ev.tier_from_pod:
        gaps.append(("wrong_tier", f"no pod tier label, and the Creating instance line not read "
                                   f"(kubernetes {ev.logs_problem}); the tier used, {ev.true_tier}, may be wrong"))
    if not ev.tier_on_card:
        gaps.append(("wrong_tier", f"the true tier {ev.true_tier!r} is not on the rate card: tier pricing not checked"))
    if ev.pods_problem is not None or ev.logs_problem is not None:
        for kind in AFFECTED_BY_STUCK:
            if kind in ev.finding_kinds:
                gaps.append((kind, "some of its hours may be stuck time the missing Kubernetes evidence would show "
                                   "(credited then as stuck_instance, and the amount may change)"))
    if not gaps:
        return Coverage(COMPLETE)
    kinds = tuple(k for k in KINDS if any(g[0] == k for g in gaps))
    why = tuple(f"{k}: {reason}" for k in kinds for kk, reason in gaps if kk == k)
    return Coverage(PARTIAL, kinds, why)


# --- the words every output uses -----------------------------------------------------------------
# They take the JSON form ({"state", "kinds", "why"}), which is what a stored case carries, so the
# CLI report, the Slack case message and its thread say the same thing. A case stored before
# coverage existed has none: it is then "not recorded", never "complete".

# Plain words for each kind; the kind's own name follows in brackets where people read it, so it
# can be searched for in the docs and the JSON.
KIND_TITLES = {
    "duplicate_charge": "Billed more than once",
    "stuck_instance": "Billed while stopped, paused or idle",
    "throttle_continuous": "Billed past the continuous-run limit",
    "throttle_daily": "Billed past the org's daily limit",
    "wrong_tier": "Charged at the wrong tier's price",
}


def kind_title(kind: str) -> str:
    return f"{KIND_TITLES.get(kind, kind)} ({kind})"


def _cov(cov: dict | Coverage | None) -> dict | None:
    return cov.as_json() if isinstance(cov, Coverage) else cov


def coverage_line(cov: dict | Coverage | None) -> str:
    c = _cov(cov)
    if not c:
        return "Coverage: not recorded for this case: do not read a missing finding as a correct charge."
    if c["state"] == COMPLETE:
        return "Coverage: complete: the database, Kubernetes and Polar answered; every kind of wrong charge was judged."
    if c["state"] == NO_RECORDS:
        return f"Coverage: no records: {c['why'][0] if c['why'] else 'no billing records in the checked periods'}."
    return f"Coverage: PARTIAL: not fully judged: {', '.join(c['kinds'])}."


def no_findings_text(cov: dict | Coverage | None, periods: list[str], credited_before: int = 0) -> str:
    c = _cov(cov)
    where = ", ".join(periods)
    if c and c["state"] == COMPLETE and credited_before:
        # wrong charges there were, so "checks out" would be false: they were credited already
        return f"Nothing left to credit: what was billed wrongly in {where} was credited before."
    if c and c["state"] == COMPLETE:
        return f"No wrong charges found: every billed hour in {where} checks out."
    if c and c["state"] == NO_RECORDS:
        return f"No wrong charges found because nothing was billed: there are no billing records in {where}."
    if c:
        return (f"No wrong charges found among what could be judged, but {', '.join(c['kinds'])} could not be "
                "fully judged: this is not an all-clear.")
    return "No wrong charges found, but this case does not record what could be judged: check again."


def check_again(sources: dict[str, str]) -> str:
    """'check again when polar is configured and kubernetes answers': a source that is not
    configured will not start answering by itself."""
    unset = [name for name, status in sources.items() if status.startswith("not configured")]
    down = [name for name, status in sources.items() if status != "ok" and name not in unset]
    waits = ([f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} configured"] if unset else []) + \
        ([f"{' and '.join(down)} answer{'s' if len(down) == 1 else ''}"] if down else [])
    return f"check again when {' and '.join(waits)}" if waits else "check again"


def next_step(cov: dict | Coverage | None, *, credit_cents: int, level_text: str, instance_id: str,
              periods: list[str], sources: dict[str, str], credited_before: int = 0) -> str:
    """The closing 'Next:' line of the text report: who can approve what, or why nothing is owed."""
    from .timeline import fmt_money

    c = _cov(cov) or {"state": "unknown", "kinds": []}
    again = check_again(sources)
    slack = f"/billing-check {instance_id}" + (f" {periods[0]}" if len(periods) == 1 else "")
    if credit_cents > 0:
        who = (f"someone at level {level_text} or higher can approve {fmt_money(credit_cents)} in Slack "
               f"({slack} opens the case with Approve / Adjust / Reject; recent credits to the same customer "
               "can raise the level there)")
        if c["state"] == COMPLETE:
            return f"Next: {who}."
        return (f"Next: {who}. That is the amount for what could be judged: {', '.join(c['kinds'])} could not be "
                f"fully judged, so {again} before approving; the amount may change.")
    if c["state"] == NO_RECORDS:
        return (f"Next: nothing to credit: {instance_id} has no billing records in {', '.join(periods)}. "
                "Check the instance id and the period against the customer's invoice.")
    if c["state"] != COMPLETE:
        return (f"Next: nothing to credit from what could be judged, but do not tell the customer the bill is right: "
                f"{', '.join(c['kinds']) or 'the findings'} could not be fully judged; {again}.")
    if credited_before:
        return "Next: nothing left to credit: what was billed wrongly was credited before, in the case listed here."
    return "Next: nothing to credit: every charge in these periods is right, and the customer can be told so."

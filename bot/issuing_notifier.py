"""What people see when money moves: the case message, the root cause in the thread, the customer
email (SMTP) or its draft in the thread, and a loud failure with a way to retry.

`issued` may run again when an earlier announcement was cut short (the sweeper retries until it
went through), so the customer is emailed at most once: the audit trail says whether they were.
"""
from __future__ import annotations

import logging

from bot import slack_io
from bot.blocks import case_message, escape, failure_message
from bot.context import BotContext
from handlers.cases import Case
from handlers.timeline import fmt_money
from services import email
from services.cases import Outcome

log = logging.getLogger(__name__)
ANNOUNCE_TRIES = 10  # sweeps (about a minute apart) before an announcement Slack keeps refusing is given up


class SlackNotifier:
    def __init__(self, ctx: BotContext, customer_lookup=None):
        self.ctx = ctx
        self.customer_lookup = customer_lookup  # async external_id -> {"name", "email"} or None

    async def issued(self, case: Case, refs: list[str], remainder_cents: int) -> None:
        """The thread note, the customer's letter, the case message: each step is done once (the
        audit trail remembers), a failed one does not stop the next, and the announcement raises
        at the end if anything failed, so the sweeper comes back for the rest."""
        ctx = self.ctx
        store = ctx.cases.store
        failed = []
        if not await store.has_event(case.id, "issue_announced"):
            try:
                cause = "\n".join(f"• *{f['kind']}* {fmt_money(f['credit_cents'])}: {f['summary']}"
                                  for f in case.report["findings"])
                await slack_io.post_thread(ctx, case, (
                    f":white_check_mark: Issued {fmt_money(case.issued_cents)} by {case.method.replace('_', ' ')} "
                    f"(approved by <@{case.decided_by}>). Polar: {', '.join(refs)}.\n*Root cause*\n{cause}"))
                if remainder_cents:
                    await slack_io.post_thread(ctx, case, (
                        f":warning: {fmt_money(remainder_cents)} could not be refunded (the order's refundable amount "
                        "was reached). It is offered as invoice credit in its own case, below."))
                await store.event(case.id, "billing-bot", "issue_announced", {})
            except Exception as exc:
                failed.append(f"thread note: {type(exc).__name__}")
        if not await store.has_event(case.id, "customer_emailed") and not await store.has_event(case.id, "email_drafted"):
            try:
                await self._letter(case, refs)
            except Exception as exc:
                failed.append(f"customer letter: {type(exc).__name__}")
        try:
            await slack_io.refresh_case_message(ctx, case)
        except Exception as exc:
            failed.append(f"case message: {type(exc).__name__}")
        if failed:
            await store.event(case.id, "billing-bot", "announce_failed", {"steps": failed})
            tries = sum(1 for e in await store.events(case.id) if e["action"] == "announce_failed")
            if tries >= ANNOUNCE_TRIES:  # a deleted message or an archived channel stays so: stop, loudly
                log.error("case %s issued; gave up announcing after %s tries: %s", case.id, tries, "; ".join(failed))
                return
            raise RuntimeError(f"case {case.id} issued, announcement incomplete ({'; '.join(failed)}); retried later")

    async def _letter(self, case: Case, refs: list[str]) -> None:
        ctx = self.ctx
        r = case.report
        customer = r.get("customer") or None
        if customer is None and self.customer_lookup is not None:
            try:
                customer = await self.customer_lookup(case.customer_id)
            except Exception:  # the email falls back to a draft; the money already moved
                customer = None
        letter = email.compose(case, customer, refs)
        if ctx.env.smtp_url and letter.to:
            try:
                await email.deliver(ctx.env.smtp_url, letter)
                await ctx.cases.store.event(case.id, "billing-bot", "customer_emailed", {"to": letter.to})
                log.info("case %s: customer emailed", case.id)
                await slack_io.safely("thread", case.id, slack_io.post_thread(
                    ctx, case, f":email: Emailed the customer ({letter.to})."))
                return
            except Exception as exc:
                log.warning("email for case %s failed: %s", case.id, type(exc).__name__)
                await slack_io.safely("thread", case.id, slack_io.post_thread(ctx, case, (
                    f":warning: The email could not be sent ({type(exc).__name__}); here is the draft to send by hand.")))
        await self._post_draft(case, f"Draft for the customer{(' <' + letter.to + '>') if letter.to else ''}:\n"
                                     f"*{letter.subject}*\n```{letter.body}```")
        await ctx.cases.store.event(case.id, "billing-bot", "email_drafted", {"to": letter.to})

    async def _post_draft(self, case: Case, text: str) -> None:
        """The draft in the case's thread; a remediation batch's case has no message of its own, so
        its draft goes to the thread of the batch's plan (where the agent looks), named by case."""
        ctx = self.ctx
        if case.message_ts or case.batch_id is None or ctx.remediation is None:
            await slack_io.post_thread(ctx, case, text)
            return
        batch = await ctx.remediation.batches.get(case.batch_id)
        if not batch or not batch["channel_id"] or not batch["message_ts"]:
            raise RuntimeError(f"batch-{case.batch_id} has no plan message to post case {case.id}'s draft in")
        await ctx.client.chat_postMessage(channel=batch["channel_id"], thread_ts=batch["message_ts"],
                                          text=f"Case #{case.id} ({escape(case.customer_id)}). {text}")

    async def failed(self, case: Case, reason: str, offer_other_method: bool) -> None:
        ctx = self.ctx
        await slack_io.safely("case message", case.id, slack_io.refresh_case_message(ctx, case))
        msg = failure_message(case, reason, offer_other_method)
        await slack_io.safely("thread", case.id, slack_io.post_thread(ctx, case, msg["text"], blocks=msg["blocks"]))
        if case.decided_by:
            link = await slack_io.permalink(ctx, case)
            await ctx.client.chat_postMessage(channel=case.decided_by, text=f"{msg['text']} {link}")

    async def rechecked(self, outcome: Outcome) -> None:
        """The issuer found the evidence changed before money moved: the approver hears it."""
        approver = outcome.previous.decided_by if outcome.previous is not None else None
        await slack_io.show_outcome(self.ctx, outcome, approver or outcome.case.requested_by, None, None)

    async def pending(self, case: Case, refs: list[str]) -> None:
        await slack_io.refresh_case_message(self.ctx, case, status=(
            f":hourglass: Approved by <@{case.decided_by}>: refund pending in Polar ({', '.join(refs)}). "
            "The customer is told once Polar confirms it."))
        await slack_io.post_thread(self.ctx, case, (
            f":hourglass: Refund pending in Polar ({', '.join(refs)}): the customer is told once Polar confirms it."))

    async def outside(self, case: Case, amount_cents: int, reason: str) -> None:
        await slack_io.post_thread(self.ctx, case, (
            f":information_source: Polar refunded {fmt_money(amount_cents)} on this order outside the bot "
            f"(reason: {reason}). It is not part of this case; check the order before crediting more."))

    async def reverted(self, case: Case, refund_id: str, amount_cents: int, status: str) -> None:
        text = (f":rotating_light: Polar reversed refund {refund_id} of {fmt_money(amount_cents)} ({status}) after "
                "reporting it succeeded: the customer does not have that money. The credit is recorded as issued; "
                "check the order in Polar and open a new check if it must be credited again.")
        await slack_io.post_thread(self.ctx, case, text)
        if case.decided_by:
            await self.ctx.client.chat_postMessage(channel=case.decided_by, text=f"Case #{case.id}: {text}")

    async def remainder_offered(self, parent: Case, child: Case) -> None:
        """The remainder's case, posted in its parent's thread, with its own buttons and pings."""
        ctx = self.ctx
        if not parent.channel_id or not parent.message_ts:
            return
        msg = case_message(child, ctx.config)
        posted = await ctx.client.chat_postMessage(channel=parent.channel_id, thread_ts=parent.message_ts,
                                                   text=msg["text"], blocks=msg["blocks"])
        child = await ctx.cases.attach_message(child, parent.channel_id, posted["ts"])
        await slack_io.ping_level(ctx, child, f"The remainder of case #{parent.id}, as invoice credit.")


"""What people see when money moves: the case message, the root cause in the thread, the customer
email (SMTP) or its draft in the thread, and a loud failure with a way to retry."""
from __future__ import annotations

import logging

from bot import slack_io
from bot.context import BotContext
from handlers.timeline import fmt_money
from services import email

log = logging.getLogger(__name__)


class SlackNotifier:
    def __init__(self, ctx: BotContext, customer_lookup=None):
        self.ctx = ctx
        self.customer_lookup = customer_lookup  # async external_id -> {"name", "email"} or None

    async def issued(self, case: dict, refs: list[str], remainder_cents: int) -> None:
        ctx = self.ctx
        await slack_io.refresh_case_message(ctx, case)
        r = case["report"]
        cause = "\n".join(f"• *{f['kind']}* {fmt_money(f['credit_cents'])}: {f['summary']}" for f in r["findings"])
        await slack_io.post_thread(ctx, case, (
            f":white_check_mark: Issued {fmt_money(case['issued_cents'])} by {case['method']} "
            f"(approved by <@{case['decided_by']}>). Polar: {', '.join(refs)}.\n*Root cause*\n{cause}"))
        if remainder_cents:
            await slack_io.post_thread(ctx, case, (
                f":warning: {fmt_money(remainder_cents)} could not be refunded (the order's refundable amount was "
                "reached). It stays on the case: a lead decides whether to credit it on the next invoice."))
        customer = (r.get("customer") or None)
        if customer is None and self.customer_lookup is not None:
            try:
                customer = await self.customer_lookup(case["customer_id"])
            except Exception:  # the email falls back to a draft; the money already moved
                customer = None
        letter = email.compose(case, customer, refs)
        if ctx.env.smtp_url and letter.to:
            try:
                await email.deliver(ctx.env.smtp_url, letter)
                await ctx.cases.event(case["id"], "billing-bot", "customer_emailed", {"to": letter.to})
                await slack_io.post_thread(ctx, case, f":email: Emailed the customer ({letter.to}).")
                return
            except Exception as exc:
                log.warning("email for case %s failed: %s", case["id"], type(exc).__name__)
                await slack_io.post_thread(ctx, case, f":warning: The email could not be sent ({type(exc).__name__}); "
                                                      "here is the draft to send by hand.")
        await ctx.cases.event(case["id"], "billing-bot", "email_drafted", {"to": letter.to})
        await slack_io.post_thread(ctx, case, f"Draft for the customer{(' <' + letter.to + '>') if letter.to else ''}:\n"
                                              f"*{letter.subject}*\n```{letter.body}```")

    async def failed(self, case: dict, reason: str, offer_invoice_credit: bool) -> None:
        ctx = self.ctx
        await slack_io.refresh_case_message(ctx, case)
        buttons = [{"type": "button", "action_id": "case_retry", "value": str(case["id"]),
                    "text": {"type": "plain_text", "text": "Retry"}}]
        if offer_invoice_credit:
            buttons.append({"type": "button", "action_id": "case_invoice_credit", "style": "primary",
                            "value": str(case["id"]), "text": {"type": "plain_text", "text": "Issue as invoice credit"}})
        text = f":x: Issuing case #{case['id']} failed: {reason}"
        if case.get("channel_id") and case.get("message_ts"):
            await ctx.client.chat_postMessage(channel=case["channel_id"], thread_ts=case["message_ts"], text=text,
                                              blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
                                                      {"type": "actions", "elements": buttons}])
        if case.get("decided_by"):
            link = await slack_io.permalink(ctx, case)
            await ctx.client.chat_postMessage(channel=case["decided_by"], text=f"{text} {link}")

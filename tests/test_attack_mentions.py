"""Attack: text that reaches Slack from the control-plane log. `Stopping instance <id> (requested by
(.+))` and `Failed to pause instance <id>: (.*)` carry free text (a user's display name or email, an
error message) into a finding's evidence and the systematic reasons; the case message and the
evidence thread post them as mrkdwn without escaping, so `<!channel>` pings the channel and
`<https://evil|Polar>` forges a link. (bot/blocks.py escapes only the ticket id and reasons.)"""
from bot.blocks import case_message, evidence_messages
from handlers.pipeline import run_case
from services.config import parse_config

from .builders import case as case_input, inst, log, rec

CONFIG = parse_config({})
PING = "<!channel> from ops"


def real_report():
    """The SPEC 5 JSON of a real check: a stop requested by someone whose name is a ping."""
    result = run_case(case_input(
        [rec(1, "10-05 08:00", "10-05 12:00", "8.32")],
        instance=inst(tier="gpu", status="running"),
        logs=[log("10-05 09:00", "stopping", PING), log("10-05 09:30", "pause_failed", "<!here> quota")]))
    finding = next(f for f in result.findings if f.kind == "stuck_instance")
    evidence = list(finding.evidence)
    assert any(PING in e for e in evidence), evidence  # the pipeline keeps the text as it was
    return {"instance_id": "i-7f3a", "org_id": "o-acme", "customer_id": "c-acme", "periods": ["2026-10"],
            "findings": [{"kind": f.kind, "credit_cents": 100, "hours": "1.0000", "summary": f.summary,
                          "evidence": list(f.evidence), "record_ids": [1]} for f in result.findings],
            "credit_cents": 100, "required_level": 1, "systematic": bool(result.systematic_reasons),
            "true_tier": "gpu", "sources": {"database": "ok", "kubernetes": "ok", "polar": "ok"},
            "credited_before": [], "notes": [], "systematic_reasons": list(result.systematic_reasons)}


def test_control_plane_text_cannot_ping_the_channel_from_the_case_thread():
    texts = evidence_messages(real_report())
    assert not any("<!channel>" in t or "<!here>" in t for t in texts), texts


def test_control_plane_text_cannot_ping_the_channel_from_the_case_message():
    c = {"id": 1, "state": "pending", "method": "refund", "report": real_report(), "credit_cents": 100,
         "proposed_cents": 100, "required_level": 1, "systematic": False, "ticket_id": None, "requested_by": "U1",
         "decided_by": None, "reason": None, "issued_cents": None}
    msg = case_message(c, CONFIG)
    mrkdwn = [e["text"] for b in msg["blocks"] for e in ([b.get("text")] + b.get("elements", []) + b.get("fields", []))
              if isinstance(e, dict) and e.get("type") == "mrkdwn"]
    assert not any("<!channel>" in t for t in mrkdwn), [t for t in mrkdwn if "<!" in t]

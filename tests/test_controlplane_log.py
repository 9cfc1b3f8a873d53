"""The control-plane messages of SPEC 1.2, in Go's standard log format."""
from handlers.timeline import fmt_time
from services.controlplane_log import parse_line, parse_lines


def test_every_message_the_bot_understands():
    cases = {
        "2026/10/03 14:02:11 Creating instance i-7f3a (tier small, org o-acme)": ("creating", "i-7f3a", "o-acme", "small"),
        "2026/10/03 14:02:11 Stopping instance i-7f3a (requested by alice@acme.io)": ("stopping", "i-7f3a", None, "alice@acme.io"),
        "2026/10/03 14:02:11 Reaping idle instance i-7f3a": ("reaping", "i-7f3a", None, ""),
        "2026/10/03 14:02:11 Pausing instance i-7f3a due to continuous_limit": ("pausing", "i-7f3a", None, "continuous_limit"),
        "2026/10/03 14:02:11 Resuming instance i-7f3a": ("resuming", "i-7f3a", None, ""),
        "2026/10/03 14:02:11 Failed to delete idle instance i-7f3a: context deadline exceeded":
            ("reap_failed", "i-7f3a", None, "context deadline exceeded"),
        "2026/10/03 14:02:11 Failed to pause instance i-7f3a: conflict: object modified":
            ("pause_failed", "i-7f3a", None, "conflict: object modified"),
        "2026/10/03 14:02:11 Instance i-7f3a exceeded continuous limit (8h0m1s > 8h0m0s)":
            ("continuous_exceeded", "i-7f3a", None, "8h0m1s > 8h0m0s"),
        "2026/10/03 14:02:11 Org o-acme exceeded daily limit (24h0m5s > 24h0m0s)":
            ("daily_exceeded", None, "o-acme", "24h0m5s > 24h0m0s"),
    }
    for line, (kind, instance, org, detail) in cases.items():
        ev = parse_line(line, "cp-0")
        assert (ev.kind, ev.instance_id, ev.org_id, ev.detail) == (kind, instance, org, detail), line
        assert fmt_time(ev.at) == "2026-10-03 14:02:11 UTC" and ev.pod == "cp-0"


def test_other_lines_are_ignored_and_microseconds_kept():
    lines = ["2026/10/03 14:02:11 Listening on :8080", "not a log line", "",
             "2026/10/03 14:02:11 Stopping instance I_BAD (requested by x)",
             "2026/10/03 14:02:11.250000 Resuming instance i-7f3a"]
    events = parse_lines(lines)
    assert len(events) == 1 and events[0].kind == "resuming"
    assert events[0].at % 1_000_000 == 250_000

"""Drive `billing-bot serve` the way Slack does: signed HTTP requests to /slack/events."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

from .fakes.slack_server import BOT_TOKEN

SIGNING_SECRET = "test-signing-secret"

CONFIG_YAML = """
levels:
  1: {users: [U_AGENT, U_AGENT2], groups: [S_AGENTS]}
  2: {users: [U_LEAD], groups: [S_LEADS]}
  3: {groups: [S_ENG]}
  4: {users: [U_VP]}
channels: {escalation: C_ESC, engineering: C_ENG, alerts: C_ALERTS}
remind_every: {remind}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sign(body: str, ts: str | None = None, secret: str = SIGNING_SECRET) -> dict:
    ts = ts or str(int(time.time()))
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig,
            "Content-Type": "application/x-www-form-urlencoded"}


class Bot:
    def __init__(self, db_url: str | None, slack, tmp: Path, *, remind: str = "4h", tick: float = 0.5, extra_env=None,
                 args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / f"bot-{self.port}.yaml"
        cfg.write_text(CONFIG_YAML.replace("{remind}", remind))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "POLAR_", "KUBE", "SMTP"))}
        env.pop("DATABASE_URL", None)
        if db_url is not None:  # None: the embedded demo database (with `serve --demo`)
            env["DATABASE_URL"] = db_url
        env.update(SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_SIGNING_SECRET=SIGNING_SECRET,
                   SLACK_API_URL=slack.api_url, PORT=str(self.port), BILLING_BOT_CONFIG=str(cfg),
                   BILLING_BOT_REMINDER_TICK_S=str(tick), **(extra_env or {}))
        self.log = open(tmp / f"bot-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "bot.cli", *(args or ["serve"])], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bot exited: {(tmp / f'bot-{self.port}.log').read_text()}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("bot did not become healthy")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.http.close()
        self.log.close()

    def post(self, form: dict, headers: dict | None = None) -> httpx.Response:
        body = urlencode(form)
        return self.http.post("/slack/events", content=body, headers=headers or sign(body))

    def command(self, text: str, user: str = "U_AGENT", channel: str = "C_SUPPORT",
                response_url: str = "https://hooks.invalid/x", name: str = "/billing-check") -> httpx.Response:
        return self.post({"command": name, "text": text, "user_id": user, "channel_id": channel,
                          "team_id": "T1", "trigger_id": "trig-1", "response_url": response_url,
                          "token": "legacy"})

    def action(self, action_id: str, case_id: int, user: str, channel: str = "C_SUPPORT") -> httpx.Response:
        payload = {"type": "block_actions", "user": {"id": user}, "team": {"id": "T1"}, "api_app_id": "A1",
                   "trigger_id": "trig-2", "channel": {"id": channel}, "container": {"type": "message"},
                   "actions": [{"action_id": action_id, "block_id": f"case_actions_{case_id}",
                                "value": str(case_id), "type": "button"}]}
        return self.post({"payload": json.dumps(payload)})

    def submit_view(self, callback_id: str, values: dict, user: str, private_metadata: str = "") -> httpx.Response:
        state = {block: {"value": {"type": "plain_text_input", "value": v}} for block, v in values.items()}
        payload = {"type": "view_submission", "user": {"id": user}, "team": {"id": "T1"}, "api_app_id": "A1",
                   "view": {"id": "V1", "type": "modal", "callback_id": callback_id, "private_metadata": private_metadata,
                            "state": {"values": state}}}
        return self.post({"payload": json.dumps(payload)})


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

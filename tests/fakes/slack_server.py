"""A small Slack Web API of ours on 127.0.0.1 (https://slack.com/api/<method> shapes), recording
every call so tests can see what the bot posted, updated, opened and whom it pinged."""
from __future__ import annotations

import itertools
import json
import threading
from urllib.parse import parse_qs

from .http import FakeApi, FakeServer, Request, Response

BOT_TOKEN = "xoxb-test-token"


class FakeSlack(FakeApi):
    def __init__(self, groups: dict[str, list[str]] | None = None, latency_s: float = 0.0):
        self.groups = groups or {}
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self._ts = itertools.count(1)
        self.faults: dict[str, list[str]] = {}  # method -> Slack errors to answer, in order
        self.down: set[str] = set()  # methods answering 'service_unavailable' until brought back
        self.server = FakeServer(self.handle, latency_s)

    def fail(self, method: str, error: str, times: int = 1) -> None:
        """The next `times` calls of `method` answer {"ok": false, "error": error}, as Slack does."""
        with self.lock:
            self.faults.setdefault(method, []).extend([error] * times)

    @property
    def api_url(self) -> str:
        return self.server.url + "/api/"

    def of(self, method: str) -> list[dict]:
        with self.lock:
            return [p for m, p in self.calls if m == method]

    def handle(self, req: Request) -> Response:
        if not req.path.startswith("/api/"):
            return Response(404, {"ok": False, "error": "unknown_method"})
        method = req.path[len("/api/"):]
        if req.headers.get("authorization") != f"Bearer {BOT_TOKEN}":
            return Response(200, {"ok": False, "error": "invalid_auth"})
        ctype = req.headers.get("content-type", "")
        payload = {k: v[0] for k, v in req.query.items()}  # GET methods such as chat.getPermalink
        if "json" in ctype:
            payload.update(req.json() or {})
        else:
            payload.update({k: v[0] for k, v in parse_qs(req.body.decode(), keep_blank_values=True).items()})
            for k in ("blocks", "view"):
                if isinstance(payload.get(k), str):
                    payload[k] = json.loads(payload[k])
        with self.lock:
            self.calls.append((method, payload))
            if method in self.down:
                return Response(503, {"ok": False, "error": "service_unavailable"})
            queued = self.faults.get(method)
            if queued:
                return Response(200, {"ok": False, "error": queued.pop(0)})
        return Response(200, self.answer(method, payload))

    def answer(self, method: str, p: dict) -> dict:
        if method == "auth.test":
            return {"ok": True, "user_id": "UBOT", "bot_id": "BBOT", "team_id": "T1", "user": "billing-bot"}
        if method == "chat.postMessage":
            if not p.get("channel"):
                return {"ok": False, "error": "channel_not_found"}
            ts = f"1700000000.{next(self._ts):06d}"
            return {"ok": True, "channel": p["channel"], "ts": ts, "message": {"text": p.get("text"), "ts": ts}}
        if method == "chat.update":
            return {"ok": True, "channel": p.get("channel"), "ts": p.get("ts"), "text": p.get("text")}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"1700000000.{next(self._ts):06d}"}
        if method == "chat.getPermalink":
            return {"ok": True, "channel": p.get("channel"),
                    "permalink": f"https://orzbob.slack.com/archives/{p.get('channel')}/p{str(p.get('message_ts')).replace('.', '')}"}
        if method in ("views.open", "views.publish", "views.update", "views.push"):
            return {"ok": True, "view": {"id": "V1", **(p.get("view") or {})}}
        if method == "usergroups.users.list":
            return {"ok": True, "users": self.groups.get(p.get("usergroup"), [])}
        if method == "conversations.open":
            return {"ok": True, "channel": {"id": "D" + str(p.get("users"))}}
        return {"ok": False, "error": "unknown_method"}

"""A small Slack Web API of ours on 127.0.0.1 (https://slack.com/api/<method> shapes), recording
every call so tests can see what the bot posted, updated, opened and whom it pinged.

Files go up the way Slack's external upload works: `files.getUploadURLExternal` hands out an upload
URL on this server (`/upload/<file_id>`, no token: Slack's are pre-signed), which takes a POST of the
raw bytes (or a multipart form with one file part); `files.completeUploadExternal` shares the
uploaded files into a channel or thread. `self.files` keeps each one, bytes included."""
from __future__ import annotations

import itertools
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
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
        self.private: set[str] = set()  # channels the bot cannot post in
        # file id -> {filename, length, content (bytes or None until uploaded), title, channel_id,
        # thread_ts, initial_comment, shared}
        self.files: dict[str, dict] = {}
        self._file_ids = itertools.count(1)
        self.server = FakeServer(self.handle, latency_s)

    def fail(self, method: str, error: str, times: int = 1) -> None:
        """The next `times` calls of `method` answer {"ok": false, "error": error}, as Slack does."""
        with self.lock:
            self.faults.setdefault(method, []).extend([error] * times)

    @property
    def api_url(self) -> str:
        return self.server.url + "/api/"

    def shared_files(self, channel: str | None = None, thread_ts: str | None = None) -> list[dict]:
        """The files completed into a channel (and thread), oldest first."""
        with self.lock:
            return [dict(f, id=i) for i, f in self.files.items() if f["shared"]
                    and (channel is None or f["channel_id"] == channel)
                    and (thread_ts is None or f["thread_ts"] == thread_ts)]

    def of(self, method: str) -> list[dict]:
        with self.lock:
            return [p for m, p in self.calls if m == method]

    @property
    def response_url(self) -> str:
        """A command's response_url, as Slack gives one (hooks.slack.com/commands/...)."""
        return self.server.url + "/commands/T1/1/response"

    def handle(self, req: Request) -> Response:
        if req.path.startswith("/commands/"):  # a response_url: no token, JSON body
            with self.lock:
                self.calls.append(("response_url", req.json() or {}))
            return Response(200, "ok")
        if req.path.startswith("/upload/"):
            return self._upload(req)
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

    def _upload(self, req: Request) -> Response:
        """The POST to an upload URL: the file's bytes, raw or as the one file part of a multipart
        form. fail("upload", ...) / down.add("upload") make it answer 500 / 503, as a broken edge does."""
        file_id = req.path[len("/upload/"):]
        body = req.body
        ctype = req.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
            parts = [p for p in msg.iter_parts() if p.get_filename() is not None] or list(msg.iter_parts())
            body = parts[0].get_payload(decode=True) if parts else b""
        with self.lock:
            self.calls.append(("upload", {"file_id": file_id, "length": len(body)}))
            if "upload" in self.down:
                return Response(503, "service unavailable", content_type="text/plain")
            queued = self.faults.get("upload")
            if queued:
                return Response(500, queued.pop(0), content_type="text/plain")
            f = self.files.get(file_id)
            if req.method != "POST" or f is None:
                return Response(404, "not found", content_type="text/plain")
            f["content"] = body
        return Response(200, f"OK - {len(body)}", content_type="text/plain")

    def _complete(self, p: dict) -> dict:
        try:
            wanted = json.loads(p.get("files") or "null")
        except ValueError:
            return {"ok": False, "error": "invalid_arguments"}
        if not isinstance(wanted, list) or not wanted or not all(isinstance(w, dict) and w.get("id") for w in wanted):
            return {"ok": False, "error": "invalid_arguments"}
        channel = p.get("channel_id") or None
        if channel in self.private:
            return {"ok": False, "error": "channel_not_found"}
        if p.get("thread_ts") and not channel:
            return {"ok": False, "error": "invalid_arguments"}
        out = []
        with self.lock:
            for w in wanted:
                f = self.files.get(w["id"])
                if f is None or f["content"] is None:  # never asked for, or its bytes never came
                    return {"ok": False, "error": "file_not_found"}
                if len(f["content"]) != f["length"]:
                    return {"ok": False, "error": "file_upload_size_mismatch"}
            for w in wanted:
                f = self.files[w["id"]]
                f.update(title=w.get("title") or f["filename"], channel_id=channel,
                         thread_ts=p.get("thread_ts") or None, initial_comment=p.get("initial_comment") or None,
                         shared=channel is not None)
                out.append({"id": w["id"], "title": f["title"], "name": f["filename"], "size": f["length"]})
        return {"ok": True, "files": out}

    def answer(self, method: str, p: dict) -> dict:
        if method == "auth.test":
            return {"ok": True, "user_id": "UBOT", "bot_id": "BBOT", "team_id": "T1", "user": "billing-bot"}
        if method == "chat.postMessage":
            if p.get("channel") in self.private:  # a private channel or DM the bot is not in
                return {"ok": False, "error": "channel_not_found"}
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
        if method == "files.getUploadURLExternal":
            try:
                length = int(p.get("length"))
            except (TypeError, ValueError):
                return {"ok": False, "error": "invalid_arguments"}
            if not p.get("filename") or length < 1:
                return {"ok": False, "error": "invalid_arguments"}
            file_id = f"F{next(self._file_ids):08d}"
            with self.lock:
                self.files[file_id] = {"filename": p["filename"], "length": length, "content": None, "title": None,
                                       "channel_id": None, "thread_ts": None, "initial_comment": None,
                                       "shared": False}
            return {"ok": True, "upload_url": f"{self.server.url}/upload/{file_id}", "file_id": file_id}
        if method == "files.completeUploadExternal":
            return self._complete(p)
        if method == "conversations.open":
            return {"ok": True, "channel": {"id": "D" + str(p.get("users"))}}
        return {"ok": False, "error": "unknown_method"}

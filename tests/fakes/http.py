"""A tiny threaded HTTP server on 127.0.0.1 for the fake Kubernetes, Polar and Slack APIs.

A handler gets a Request and returns a Response (or raises DropConnection to close the socket
without answering, the way a lost response looks to a client). Latency can be injected per request.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body or b"null")

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int = 200
    body: bytes | str | dict | list | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


class DropConnection(Exception):
    """Close the connection without a response."""


class FakeServer:
    def __init__(self, handler: Callable[[Request], Response], latency_s: float = 0.0):
        self.handler = handler
        self.latency_s = latency_s
        self.requests: list[Request] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out as separate writes: without this, Nagle's algorithm and the
            # client's delayed ACK add ~40 ms to every response, which no real API server does
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _serve(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:  # the client went away mid-request: no request at all
                    self.close_connection = True
                    return
                req = Request(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                              {k.lower(): v for k, v in self.headers.items()}, body)
                outer.requests.append(req)
                if outer.latency_s:
                    time.sleep(outer.latency_s)
                try:
                    resp = outer.handler(req)
                except DropConnection:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                data = resp.encoded()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in resp.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        class Server(ThreadingHTTPServer):
            # socketserver's listen backlog is 5: a burst of new connections (a batch's workers,
            # a plan's reads) overflows it and the client's SYN waits a 1 s retransmit, a delay no
            # real server adds
            request_queue_size = 256

            def handle_error(self, request, client_address):  # clients we cut off on purpose
                pass

        self.httpd = Server(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeApi:
    """Base of our fake APIs: a FakeServer in `self.server`, started and stopped with the fake."""

    server: FakeServer

    @property
    def url(self) -> str:
        return self.server.url

    def start(self):
        self.server.start()
        return self

    def stop(self):
        self.server.stop()

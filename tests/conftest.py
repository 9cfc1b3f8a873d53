"""Shared fixtures: a real PostgreSQL (pgserver) for the session, a fresh database per test,
and the fake Kubernetes and Polar servers on 127.0.0.1."""
from __future__ import annotations

import os
import uuid

import psycopg
import pytest

from services.embedded import controlplane_ddl

from .fakes.kube_server import FakeKube
from .fakes.polar_server import TOKEN as POLAR_TOKEN, FakePolar


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
        warnings.simplefilter("ignore")
        import pgserver

    folder = tmp_path_factory.mktemp("pgdata")
    server = pgserver.get_server(str(folder), cleanup_mode="stop")
    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE cp_template")
    with psycopg.connect(_db_url(admin, "cp_template"), autocommit=True) as conn:
        conn.execute(controlplane_ddl())
    yield admin
    server.cleanup()


def _db_url(admin_url: str, name: str) -> str:
    head, _, query = admin_url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}?{query}" if query else f"{base}/{name}"


@pytest.fixture
def db_url(pg_server):
    """A fresh database with the control-plane schema, for one test."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE cp_template")
    url = _db_url(pg_server, name)
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        yield conn


@pytest.fixture
def polar():
    fake = FakePolar().start()
    yield fake
    fake.stop()
    assert fake.violations == [], "requests or responses off Polar's OpenAPI document"


@pytest.fixture
def kube():
    fake = FakeKube().start()
    yield fake
    fake.stop()


@pytest.fixture
def bot_env(db_url, kube, polar, tmp_path):
    """The environment of SPEC 5, pointing at our servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "POLAR_", "KUBE", "SMTP"))}
    env.update(DATABASE_URL=db_url, KUBECONFIG=str(kube.kubeconfig(tmp_path)), POLAR_API_URL=polar.url,
               POLAR_API_KEY=POLAR_TOKEN)
    env.pop("BILLING_BOT_CONFIG", None)
    return env


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            import email
            from email import policy
            msg = email.message_from_bytes(envelope.content, policy=policy.default)
            text = f"Subject: {msg['Subject']}\n\n" + msg.get_content()  # decoded as a mail client shows it
            self.messages.append((envelope.rcpt_tos, text))
            return "250 OK"

    from .slack_harness import free_port

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    inbox.url = f"smtp://127.0.0.1:{port}?from=support@orzbob.cloud"
    yield inbox
    controller.stop()

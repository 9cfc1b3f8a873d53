"""The remediation plan's CSV goes to Slack by the external upload (files.getUploadURLExternal, a POST
of the bytes to the URL it gave, files.completeUploadExternal), through the real slack_sdk client
against the fake Slack server; a refusal is logged and never raised (bot/slack_io.upload_csv)."""
from __future__ import annotations

import asyncio
import logging

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

import pytest

from bot.app import slack_client
from bot.slack_io import upload_csv
from services.config import Env

from .fakes.slack_server import BOT_TOKEN, FakeSlack

CSV = "customer_id,instance_ids,hours,credit_cents\nc-1,i-a i-b,3.5000,1234\nc-ü,i-c,1.0000,99\n"


@pytest.fixture
def slack():
    fake = FakeSlack().start()
    yield fake
    fake.stop()


def client(slack: FakeSlack) -> AsyncWebClient:
    """The bot's own client (bot/app.py), with its retry handlers, pointed at the fake."""
    return slack_client(Env(slack_bot_token=BOT_TOKEN, slack_api_url=slack.api_url))


def test_the_csv_lands_in_the_thread_byte_for_byte(slack):
    file_id = asyncio.run(upload_csv(client(slack), "C_ENG", "1700000000.000001", "plan.csv", CSV, "Plan #1"))
    assert file_id is not None
    [f] = slack.shared_files("C_ENG", "1700000000.000001")
    assert f["id"] == file_id and f["content"] == CSV.encode("utf-8") and f["length"] == len(CSV.encode())
    assert f["filename"] == "plan.csv" and f["title"] == "Plan #1"
    # the two Web API calls, in Slack's wire format, and the POST to the upload URL between them
    [url_call] = slack.of("files.getUploadURLExternal")
    assert url_call["filename"] == "plan.csv" and int(url_call["length"]) == len(CSV.encode())
    [done] = slack.of("files.completeUploadExternal")
    assert done["channel_id"] == "C_ENG" and done["thread_ts"] == "1700000000.000001"
    assert [m for m, _ in slack.calls] == ["files.getUploadURLExternal", "upload", "files.completeUploadExternal"]


def test_the_fake_speaks_the_wire_format_to_a_plain_client(slack):
    """A multipart POST to the upload URL is taken too, and completing a file whose bytes never came is refused."""
    async def go():
        c = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url)
        r = await c.files_getUploadURLExternal(filename="a.csv", length=3)
        assert r["upload_url"].startswith(slack.server.url + "/upload/")
        with pytest.raises(SlackApiError) as exc:
            await c.files_completeUploadExternal(files=[{"id": r["file_id"], "title": "A"}], channel_id="C1")
        assert exc.value.response["error"] == "file_not_found"
        import aiohttp
        async with aiohttp.ClientSession() as s:
            form = aiohttp.FormData()
            form.add_field("file", b"a,b", filename="a.csv", content_type="text/csv")
            async with s.post(r["upload_url"], data=form) as resp:
                assert resp.status == 200
        done = await c.files_completeUploadExternal(files=[{"id": r["file_id"], "title": "A"}], channel_id="C1",
                                                    initial_comment="the plan")
        assert done["files"][0]["id"] == r["file_id"]
        await c.session.close() if c.session else None
    asyncio.run(go())
    [f] = slack.shared_files("C1")
    assert f["content"] == b"a,b" and f["thread_ts"] is None and f["initial_comment"] == "the plan"


@pytest.mark.parametrize("fault", ["url", "complete", "down", "upload"])
def test_a_refusal_is_one_logged_line_and_none(slack, caplog, fault):
    if fault == "url":
        slack.fail("files.getUploadURLExternal", "not_allowed_token_type")
    elif fault == "complete":
        slack.fail("files.completeUploadExternal", "channel_not_found")
    elif fault == "down":  # 503 until brought back: the client's retries give up
        slack.down.add("files.getUploadURLExternal")
    else:
        slack.fail("upload", "edge broken", times=5)
    with caplog.at_level(logging.WARNING, logger="bot.slack_io"):
        got = asyncio.run(upload_csv(client(slack), "C_ENG", "1700000000.000001", "plan.csv", CSV, "Plan"))
    assert got is None and slack.shared_files() == []
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.slack_io"]
    assert len(lines) == 1 and "plan.csv not shared in C_ENG" in lines[0] and "\n" not in lines[0]
    expected = {"url": "not_allowed_token_type", "complete": "channel_not_found", "down": "service_unavailable",
                "upload": "status: 500"}[fault]
    assert expected in lines[0]

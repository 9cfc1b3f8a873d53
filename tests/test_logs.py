"""services/logs.py: the one logging set-up every entry point calls."""
import io
import json
import logging
import re

import pytest

from services.logs import JsonFormatter, setup_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in ("urllib3", "psycopg", "py.warnings")})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_the_fields_extras_and_the_exception(restore_logging):
    out = io.StringIO()
    setup_logging(logging.INFO, environ={"LOG_FORMAT": "json"}, stream=out)
    log = logging.getLogger("services.issuing")
    log.info("issued case %s", 42, extra={"case_id": 42, "amount_cents": 1028})
    log.debug("not at INFO")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("issuing failed", extra={"case_id": 43})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert {k: first[k] for k in ("level", "logger", "msg", "case_id", "amount_cents")} == {
        "level": "INFO", "logger": "services.issuing", "msg": "issued case 42", "case_id": 42, "amount_cents": 1028}
    assert second["level"] == "ERROR" and second["case_id"] == 43 and "RuntimeError: boom" in second["exc"]


def test_text_lines_have_utc_timestamps_and_replace_an_earlier_setup(restore_logging):
    first, out = io.StringIO(), io.StringIO()
    setup_logging(logging.WARNING, environ={}, stream=first)
    setup_logging(logging.INFO, environ={}, stream=out)  # serve's INFO wins over an earlier WARNING set-up
    logging.getLogger("bot.app").info("listening on :%s", 3000)
    assert first.getvalue() == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO bot\.app: listening on :3000\n", out.getvalue())


def test_library_retry_noise_stays_off_the_terminal(restore_logging):
    out = io.StringIO()
    setup_logging(logging.INFO, environ={}, stream=out)
    logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=2)) after connection broken")
    logging.getLogger("urllib3.connectionpool").error("a real error still shows")
    assert "Retrying" not in out.getvalue() and "a real error still shows" in out.getvalue()


def test_the_json_formatter_stringifies_what_json_cannot_hold():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.when = object()
    assert json.loads(JsonFormatter().format(record))["when"].startswith("<object object")

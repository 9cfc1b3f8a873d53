"""Logging set-up for every entry point: timestamped text lines, or JSON lines for Kubernetes.

`setup_logging(level)` is called once by the CLI (`billing-bot serve` at INFO, the one-shot
commands at WARNING so a report is not interleaved with chatter). LOG_FORMAT=json gives one JSON
object per line (`ts`, `level`, `logger`, `msg`, plus any `extra=` fields and `exc`), which log
collectors parse without a regex. Library loggers that would print retry noise on the terminal
(urllib3's warning per Kubernetes retry; for one-shot commands also psycopg's pool, a warning per
failed connection attempt) are held at ERROR: the bot reports those failures itself, once, in its
own words. Python warnings go through logging too, at ERROR only, so no library's DeprecationWarning
reaches an operator's terminal (the test suite turns our own into errors, see pyproject.toml).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Mapping

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

# These libraries log failures we already report once, in our words (a source's `failed: ...`, the
# CLI's one line): urllib3 warns on every Kubernetes retry; pgserver logs its start-up steps.
QUIET_LOGGERS = ("urllib3", "kubernetes", "pgserver")
# psycopg's pool (logger "psycopg.pool") warns once per failed connection attempt, with libpq's
# multi-line message. A one-shot command quiets it: its one line on stderr says what failed.
# `serve` keeps it: "discarding broken connection" is what an operator wants to see after a failover.
QUIET_FOR_COMMANDS = QUIET_LOGGERS + ("psycopg",)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601 with milliseconds), level, logger, msg, extras."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict = {"ts": ts, "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class UtcFormatter(logging.Formatter):
    converter = time.gmtime  # the pods, the database and Slack all speak UTC

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


def setup_logging(level: int = logging.INFO, environ: Mapping[str, str] | None = None, stream=None,
                  quiet: tuple[str, ...] = QUIET_LOGGERS) -> None:
    """Configure the root logger (replacing any earlier set-up): text or JSON lines on stderr."""
    e = os.environ if environ is None else environ
    handler = logging.StreamHandler(stream or sys.stderr)
    fmt = (e.get("LOG_FORMAT") or "text").strip().lower()
    handler.setFormatter(JsonFormatter() if fmt == "json" else UtcFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)  # a library's warnings.warn goes through the handler, not raw to stderr
    logging.getLogger("py.warnings").setLevel(logging.ERROR)

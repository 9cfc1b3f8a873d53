"""Jinja2 templates: Block Kit messages, emails and the CLI report. `render(name, **ctx)`."""
from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from handlers.coverage import check_again, coverage_line, kind_title, next_step, no_findings_text
from handlers.pipeline import id_ranges
from handlers.timeline import fmt_money, hours_text

_DIR = Path(__file__).parent


def _env(autoescape: bool) -> Environment:
    env = Environment(loader=FileSystemLoader(str(_DIR)), undefined=StrictUndefined, autoescape=autoescape,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["money"] = fmt_money
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["kind_title"] = kind_title
    env.filters["id_ranges"] = id_ranges
    # the same coverage and next-step sentences in the report, the case message and the thread
    env.globals["hours"] = lambda h: hours_text(h).rstrip("0").rstrip(".")
    env.globals.update(check_again=check_again, coverage_line=coverage_line, no_findings_text=no_findings_text, next_step=next_step)
    return env


_TEXT = _env(False)


def render(name: str, **context) -> str:
    return _TEXT.get_template(name).render(**context)

"""Jinja2 templates: Block Kit messages, emails and the CLI report. `render(name, **ctx)`."""
from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from handlers.timeline import fmt_money

_DIR = Path(__file__).parent


def _env(autoescape: bool) -> Environment:
    env = Environment(loader=FileSystemLoader(str(_DIR)), undefined=StrictUndefined, autoescape=autoescape,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["money"] = fmt_money
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env


_TEXT = _env(False)


def render(name: str, **context) -> str:
    return _TEXT.get_template(name).render(**context)

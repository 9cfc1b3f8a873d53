"""The bot's configuration: the YAML file named by BILLING_BOT_CONFIG plus the environment.

Every YAML key is optional (SPEC 5.1). An unknown key or a bad value raises ConfigError with the
dotted path of the key, so the bot stops at start with a message an operator can act on.
Secrets (tokens, API keys, SMTP credentials) only ever come from the environment.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

import yaml

from handlers.settings import (  # noqa: F401  (re-exported: the settings are read through here)
    DEFAULT_LEVELS, DEFAULT_RATE_CARD, Config, KubernetesSettings, Level, PolarSettings, Throttle,
)


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


# Issuings at once per process (services/issuing.Issuer.workers), BILLING_BOT_ISSUING_WORKERS. The
# workers have a connection pool of their own (workers + 1: the sweeper), so more of them never take
# the connections the checks and Slack's listeners use. 12: issue 16's batch of 2,000 cases (50 ms a
# Polar call) issued fastest on the bench's 2-core machine at 12 (6, 8 and 16 slower; see
# bench/remediation_bench.py); a replica then holds at most 8 + 13 connections.
ISSUING_WORKERS = 12
MAX_ISSUING_WORKERS = 64


def _digits(text: str) -> bool:
    """A few ASCII digits: str.isdigit() also takes '²' and 5,000 digits, where int() then raises a
    bare ValueError that names no key."""
    return text.isascii() and text.isdigit() and len(text) <= 9


@dataclass(frozen=True)
class Env:
    """What the environment says (SPEC 5). Secrets live here and are never logged."""

    database_url: str | None = None
    kubeconfig: str | None = None
    in_cluster: bool = False
    polar_api_url: str = "https://api.polar.sh"
    polar_api_key: str | None = field(default=None, repr=False)
    polar_api_url_set: bool = False  # POLAR_API_URL named explicitly (a sandbox, a proxy, a test server)
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_signing_secret: str | None = field(default=None, repr=False)
    slack_app_token: str | None = field(default=None, repr=False)
    slack_api_url: str = "https://slack.com/api/"
    smtp_url: str | None = field(default=None, repr=False)
    polar_webhook_secret: str | None = field(default=None, repr=False)
    port: int = 3000
    issuing_workers: int = ISSUING_WORKERS  # BILLING_BOT_ISSUING_WORKERS

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Env":
        e = os.environ if environ is None else environ
        port_text = e.get("PORT") or "3000"
        if not _digits(port_text) or not 0 < int(port_text) < 65536:
            raise ConfigError(f"PORT: expected a TCP port number, got {port_text!r}")
        workers_text = (e.get("BILLING_BOT_ISSUING_WORKERS") or str(ISSUING_WORKERS)).strip()
        if not _digits(workers_text) or not 1 <= int(workers_text) <= MAX_ISSUING_WORKERS:
            raise ConfigError(f"BILLING_BOT_ISSUING_WORKERS: expected a whole number from 1 to {MAX_ISSUING_WORKERS},"
                              f" got {workers_text!r}")
        return cls(
            database_url=e.get("DATABASE_URL") or None,
            kubeconfig=e.get("KUBECONFIG") or None,
            in_cluster=bool(e.get("KUBERNETES_SERVICE_HOST")),
            polar_api_url=(e.get("POLAR_API_URL") or "https://api.polar.sh").rstrip("/"),
            polar_api_key=e.get("POLAR_API_KEY") or None,
            polar_api_url_set=bool(e.get("POLAR_API_URL")),
            slack_bot_token=e.get("SLACK_BOT_TOKEN") or None,
            slack_signing_secret=e.get("SLACK_SIGNING_SECRET") or None,
            slack_app_token=e.get("SLACK_APP_TOKEN") or None,
            slack_api_url=e.get("SLACK_API_URL") or "https://slack.com/api/",
            smtp_url=e.get("SMTP_URL") or None,
            polar_webhook_secret=e.get("POLAR_WEBHOOK_SECRET") or None,
            port=int(port_text),
            issuing_workers=int(workers_text),
        )


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(value: Any, key: str) -> timedelta:
    """'8h', '30m', '1h30m', '2d', '90s' or a whole number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 8h or 30m, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a duration cannot be negative")
        return timedelta(seconds=value)
    if isinstance(value, str) and value.strip().isdecimal() and value.strip().isascii():
        return timedelta(seconds=int(value.strip()))  # a bare number is seconds, as an int is
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m and any(m.groups()):
            d, h, mi, s = (int(g or 0) for g in m.groups())
            return timedelta(days=d, hours=h, minutes=mi, seconds=s)
    raise ConfigError(f"{key}: expected a duration like 8h or 30m, got {value!r}")


def parse_money(value: Any, key: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{key}: expected an amount like \"50.00\", got {value!r}")
    try:
        # str() first so a YAML float such as 50.5 keeps the digits the operator typed.
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{key}: expected an amount like \"50.00\", got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"{key}: expected a non-negative amount, got {value!r}")
    return amount


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _only(mapping: dict, allowed: set[str], prefix: str) -> None:
    for k in mapping:
        if str(k) not in allowed:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _ids(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of Slack ids")
    return tuple(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _levels(raw: Any) -> dict[int, Level]:
    raw = _mapping(raw, "levels")
    levels: dict[int, Level] = {}
    for number in (1, 2, 3, 4):
        levels[number] = None  # type: ignore[assignment]
    for k in raw:
        if str(k) not in {"1", "2", "3", "4"}:
            raise ConfigError(f"levels.{k}: unknown level (levels are 1, 2, 3 and 4)")
    for number, defaults in DEFAULT_LEVELS.items():
        given = raw.get(number, raw.get(str(number))) or {}
        key = f"levels.{number}"
        given = _mapping(given, key)
        _only(given, {"name", "limit", "money", "users", "groups"}, key)
        merged = {**defaults, **given}
        money = _bool(merged["money"], f"{key}.money")
        limit = None if merged["limit"] is None else parse_money(merged["limit"], f"{key}.limit")
        levels[number] = Level(
            number=number,
            name=_str(merged["name"], f"{key}.name"),
            limit=limit,
            money=money,
            users=_ids(merged.get("users"), f"{key}.users"),
            groups=_ids(merged.get("groups"), f"{key}.groups"),
        )
    money = [lv for lv in levels.values() if lv.money]
    top = max((lv.number for lv in money), default=None)
    for lv in levels.values():
        key = f"levels.{lv.number}.limit"
        if not lv.money and lv.limit is not None:
            # a limit there would be read as authority that the level does not have, and ignored
            raise ConfigError(f"{key}: level {lv.number} has no money authority (money: false), so it takes no "
                              f"limit; remove the limit, or set money: true")
        if lv.money and lv.limit is None and lv.number != top:
            # an unlimited lower level would approve any amount while messages still name a higher level
            raise ConfigError(f"{key}: only the top money level (level {top}) may be unlimited (null); give level "
                              f"{lv.number} an amount like \"50.00\"")
    money_limits = [lv.limit for lv in money if lv.limit is not None]
    if money_limits != sorted(money_limits):
        raise ConfigError("levels: money limits must grow with the level number")
    return levels


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line 3, column 9: mapping values are not allowed here', from PyYAML's marks (0-based)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "not valid YAML"
    if mark is None:
        return f"not valid YAML: {problem}"
    context = getattr(exc, "context", None)
    extra = f" ({context} at line {exc.context_mark.line + 1})" if context and getattr(exc, "context_mark", None) \
        and exc.context_mark is not mark else ""
    return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}{extra}"


# A Kubernetes label key: an optional DNS-subdomain prefix and "/", then a name of at most 63
# characters, alphanumeric at both ends with - _ . inside.
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^(?:(?=.{{1,253}}/)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$")


def _label_key(value: Any, key: str) -> str:
    text = _str(value, key)
    if not _LABEL_KEY.match(text):
        raise ConfigError(f"{key}: not a Kubernetes label key (like tier or example.com/tier): {text!r}")
    return text


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file (path, else BILLING_BOT_CONFIG, else all defaults)."""
    e = os.environ if environ is None else environ
    path = path or e.get("BILLING_BOT_CONFIG") or None
    raw: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"BILLING_BOT_CONFIG: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"BILLING_BOT_CONFIG: {path}: {_yaml_problem(exc)}") from None
    return parse_config(raw, schema=e.get("BILLING_BOT_SCHEMA") or "billing_bot")


DEFAULTS = Config(levels={})  # every default of SPEC 5.1 is the dataclasses' own (handlers/settings.py)


def parse_config(raw: Any, schema: str = "billing_bot") -> Config:
    raw = _mapping(raw, "config")
    _only(
        raw,
        {"levels", "four_eyes", "exposure_window", "remind_every", "channels", "rate_card", "throttle_defaults",
         "systematic_min_customers", "kubernetes", "polar", "reconcile"},
        "",
    )
    channels_raw = _mapping(raw.get("channels"), "channels")
    _only(channels_raw, {"escalation", "engineering", "alerts"}, "channels")
    channels = {k: None for k in ("escalation", "engineering", "alerts")}
    for k, v in channels_raw.items():
        channels[k] = None if v is None else _str(v, f"channels.{k}")

    rate_raw = raw.get("rate_card")
    rate_card = dict(DEFAULT_RATE_CARD)
    if rate_raw is not None:
        rate_raw = _mapping(rate_raw, "rate_card")
        rate_card = {str(k): parse_money(v, f"rate_card.{k}") for k, v in rate_raw.items()}
        if not rate_card:
            raise ConfigError("rate_card: at least one tier is needed")

    thr_raw = _mapping(raw.get("throttle_defaults"), "throttle_defaults")
    _only(thr_raw, {"continuous_limit", "daily_limit", "idle_timeout"}, "throttle_defaults")
    thr = {}
    for k in ("continuous_limit", "daily_limit", "idle_timeout"):
        if k not in thr_raw:  # the default is the dataclass's (handlers/settings.py), said once
            thr[k] = getattr(DEFAULTS.throttle_defaults, k)
            continue
        v = thr_raw[k]
        thr[k] = None if v is None else parse_duration(v, f"throttle_defaults.{k}")

    kube_raw = _mapping(raw.get("kubernetes"), "kubernetes")
    _only(kube_raw, {"instances_namespace", "system_namespace", "control_plane_deployment", "labels"}, "kubernetes")
    labels_raw = _mapping(kube_raw.get("labels"), "kubernetes.labels")
    _only(labels_raw, {"instance", "org", "tier"}, "kubernetes.labels")
    k8s = KubernetesSettings()
    kube = KubernetesSettings(
        instances_namespace=_str(kube_raw.get("instances_namespace", k8s.instances_namespace),
                                 "kubernetes.instances_namespace"),
        system_namespace=_str(kube_raw.get("system_namespace", k8s.system_namespace), "kubernetes.system_namespace"),
        control_plane_deployment=_str(kube_raw.get("control_plane_deployment", k8s.control_plane_deployment),
                                      "kubernetes.control_plane_deployment"),
        label_instance=_label_key(labels_raw.get("instance", k8s.label_instance), "kubernetes.labels.instance"),
        label_org=_label_key(labels_raw.get("org", k8s.label_org), "kubernetes.labels.org"),
        label_tier=_label_key(labels_raw.get("tier", k8s.label_tier), "kubernetes.labels.tier"),
    )

    polar_raw = _mapping(raw.get("polar"), "polar")
    _only(polar_raw, {"credit_method", "usage_event_name", "api_version"}, "polar")
    pol = PolarSettings()
    method = polar_raw.get("credit_method", pol.credit_method)
    if method not in ("refund", "invoice_credit"):
        raise ConfigError(f"polar.credit_method: expected refund or invoice_credit, got {method!r}")
    polar = PolarSettings(
        credit_method=method,
        usage_event_name=_str(polar_raw.get("usage_event_name", pol.usage_event_name), "polar.usage_event_name"),
        api_version=_str(str(polar_raw.get("api_version", pol.api_version)), "polar.api_version"),
    )

    rec_raw = _mapping(raw.get("reconcile"), "reconcile")
    _only(rec_raw, {"usage_tolerance_hours"}, "reconcile")
    tolerance = parse_money(rec_raw.get("usage_tolerance_hours", DEFAULTS.usage_tolerance_hours),
                            "reconcile.usage_tolerance_hours")

    smc = raw.get("systematic_min_customers", DEFAULTS.systematic_min_customers)
    if isinstance(smc, bool) or not isinstance(smc, int) or smc < 1:
        raise ConfigError(f"systematic_min_customers: expected a whole number of at least 1, got {smc!r}")

    exposure = raw.get("exposure_window", DEFAULTS.exposure_window)
    exposure = exposure if isinstance(exposure, timedelta) else parse_duration(exposure, "exposure_window")

    remind = raw.get("remind_every", DEFAULTS.remind_every)
    remind = remind if isinstance(remind, timedelta) else parse_duration(remind, "remind_every")
    if remind <= timedelta(0):
        raise ConfigError("remind_every: must be longer than zero")

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ConfigError(f"BILLING_BOT_SCHEMA: not a plain schema name: {schema!r}")

    return Config(
        levels=_levels(raw.get("levels")),
        four_eyes=_bool(raw.get("four_eyes", DEFAULTS.four_eyes), "four_eyes"),
        exposure_window=exposure,
        remind_every=remind,
        channels=channels,
        rate_card=rate_card,
        throttle_defaults=Throttle(**thr),
        systematic_min_customers=smc,
        kubernetes=kube,
        polar=polar,
        usage_tolerance_hours=tolerance,
        bot_schema=schema,
    )

"""SPEC 5.1: every key optional; an unknown key or bad value names the key."""
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest

from services.config import ConfigError, Env, load_config, parse_config


def test_defaults_match_the_spec():
    c = parse_config({})
    assert [(lv.number, lv.limit, lv.money) for lv in c.levels.values()] == [
        (1, Decimal("50.00"), True), (2, Decimal("500.00"), True), (3, None, False), (4, None, True)]
    assert c.rate_card == {"small": Decimal("0.083"), "medium": Decimal("0.167"), "large": Decimal("0.333"),
                           "gpu": Decimal("2.08")}
    assert c.throttle_defaults.continuous_limit == timedelta(hours=8)
    assert c.throttle_defaults.daily_limit == timedelta(hours=24)
    assert c.throttle_defaults.idle_timeout == timedelta(minutes=30)
    assert c.remind_every == timedelta(hours=4) and c.four_eyes is False and c.systematic_min_customers == 3
    assert c.kubernetes.instances_namespace == "orzbob-instances" and c.kubernetes.label_tier == "tier"
    assert c.polar.credit_method == "refund" and c.polar.usage_event_name == "compute_hours"


@pytest.mark.parametrize("raw,key", [
    ({"bogus": 1}, "bogus"),
    ({"levels": {2: {"limit": "lots"}}}, "levels.2.limit"),
    ({"levels": {5: {}}}, "levels.5"),
    ({"levels": {1: {"colour": "red"}}}, "levels.1.colour"),
    ({"remind_every": "soon"}, "remind_every"),
    ({"throttle_defaults": {"daily_limit": "24 hours please"}}, "throttle_defaults.daily_limit"),
    ({"kubernetes": {"labels": {"pod": "x"}}}, "kubernetes.labels.pod"),
    ({"polar": {"credit_method": "cash"}}, "polar.credit_method"),
    ({"rate_card": {"gpu": "-1"}}, "rate_card.gpu"),
    ({"four_eyes": "yes"}, "four_eyes"),
    ({"systematic_min_customers": 0}, "systematic_min_customers"),
    ({"channels": {"alerts": ""}}, "channels.alerts"),
    ({"levels": {1: {"users": "U123"}}}, "levels.1.users"),
    ({"levels": {1: {"limit": None}}}, "levels.1.limit"),
    ({"levels": {2: {"limit": None}}}, "levels.2.limit"),
    ({"levels": {3: {"limit": "100.00"}}}, "levels.3.limit"),
    ({"kubernetes": {"labels": {"tier": "not a label!"}}}, "kubernetes.labels.tier"),
    ({"kubernetes": {"labels": {"org": "-org"}}}, "kubernetes.labels.org"),
    ({"kubernetes": {"labels": {"instance": ""}}}, "kubernetes.labels.instance"),
])
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key + ":")


def test_switching_limits_off_and_custom_values():
    c = parse_config({"throttle_defaults": {"idle_timeout": None, "continuous_limit": "1h30m"},
                      "levels": {1: {"users": ["U1"], "groups": ["S1"]}}, "remind_every": "2h"})
    assert c.throttle_defaults.idle_timeout is None
    assert c.throttle_defaults.continuous_limit == timedelta(minutes=90)
    assert c.levels[1].users == ("U1",) and c.levels[1].groups == ("S1",)


def test_env_rejects_a_bad_port_and_hides_secrets():
    with pytest.raises(ConfigError, match="PORT"):
        Env.from_environ({"PORT": "http"})
    env = Env.from_environ({"POLAR_API_KEY": "sekrit", "SLACK_BOT_TOKEN": "xoxb-sekrit"})
    assert "sekrit" not in repr(env)


def test_cli_stops_at_start_naming_the_key(tmp_path):
    cfg = tmp_path / "bot.yaml"
    cfg.write_text("levels:\n  2: {limit: lots}\n")
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "check", "i-7f3a"], capture_output=True, text=True,
                          env={"BILLING_BOT_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "billing-bot: levels.2.limit: expected an amount like \"50.00\", got 'lots'"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="BILLING_BOT_CONFIG: cannot read"):
        load_config(str(tmp_path / "nope.yaml"))


def test_only_the_top_money_level_may_be_unlimited_and_says_so():
    with pytest.raises(ConfigError) as err:
        parse_config({"levels": {1: {"limit": None}}})
    assert str(err.value) == ('levels.1.limit: only the top money level (level 4) may be unlimited (null); '
                              'give level 1 an amount like "50.00"')
    with pytest.raises(ConfigError) as err:
        parse_config({"levels": {3: {"limit": "100.00"}}})
    assert str(err.value) == ("levels.3.limit: level 3 has no money authority (money: false), so it takes no "
                              "limit; remove the limit, or set money: true")
    # what stays allowed: level 3 given money authority and a limit; a prefixed label key
    c = parse_config({"levels": {3: {"money": True, "limit": "1000.00"}},
                      "kubernetes": {"labels": {"tier": "orzbob.cloud/tier"}}})
    assert c.levels[3].limit == Decimal("1000.00") and c.required_level(60000) == 3
    assert c.kubernetes.label_tier == "orzbob.cloud/tier"


def test_unknown_label_key_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        parse_config({"kubernetes": {"labels": {"tier": "tier", "zone": "zone"}}})
    assert str(err.value) == "kubernetes.labels.zone: unknown key (allowed: instance, org, tier)"


@pytest.mark.parametrize("text,where", [
    ("levels:\n  1: {limit: \"5\"\n  2: {}\n", "line 3, column 3"),
    ("channels:\n  alerts: C1\n   engineering: C2\n", "line 3, column 15"),
    ("four_eyes: true\n\tremind_every: 2h\n", "line 2, column 1"),
])
def test_yaml_syntax_errors_give_line_and_column(tmp_path, text, where):
    cfg = tmp_path / "bot.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg))
    msg = str(err.value)
    assert msg.startswith(f"BILLING_BOT_CONFIG: {cfg}: not valid YAML at {where}: "), msg
    assert "\n" not in msg  # one line

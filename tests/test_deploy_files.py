"""The Slack manifest and Kubernetes files parse and say what the bot needs (read-only RBAC)."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_manifest_declares_commands_interactivity_home_and_scopes():
    m = yaml.safe_load((ROOT / "manifest.yml").read_text())
    assert {c["command"] for c in m["features"]["slash_commands"]} == {"/billing-check", "/billing-report"}
    assert all(c["url"].endswith("/slack/events") for c in m["features"]["slash_commands"])
    assert m["settings"]["interactivity"]["is_enabled"] and m["features"]["app_home"]["home_tab_enabled"]
    assert {"commands", "chat:write", "usergroups:read"} <= set(m["oauth_config"]["scopes"]["bot"])
    assert "app_home_opened" in m["settings"]["event_subscriptions"]["bot_events"]


def test_rbac_is_read_only():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()))
    verbs = {v for d in docs if d["kind"] == "Role" for rule in d["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list"}
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"} == {"orzbob-instances", "orzbob-system"}


def test_deployment_has_probes_and_secret_refs_and_the_cronjob_runs_reconcile():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "deployment.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz" and c["envFrom"][0]["secretRef"]["name"]
    cron = yaml.safe_load((ROOT / "deploy" / "cronjob.yaml").read_text())
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["reconcile", "--post"]


def test_the_sharded_reconciliation_is_an_indexed_job_whose_pods_name_their_shard_and_run():
    cron = yaml.safe_load((ROOT / "deploy" / "reconcile-shards.yaml").read_text())
    job = cron["spec"]["jobTemplate"]["spec"]
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    c = job["template"]["spec"]["containers"][0]
    n = job["completions"]
    # each pod runs one shard of n, and all pods of one Job share a run key that Kubernetes sets
    assert c["args"] == ["reconcile", "--post", "--shard", f"$(JOB_COMPLETION_INDEX)/{n}", "--run", "$(RUN_KEY)"]
    run_key = next(e for e in c["env"] if e["name"] == "RUN_KEY")
    assert run_key["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert job["template"]["spec"]["restartPolicy"] == "Never" and c["envFrom"][0]["secretRef"]["name"]
    # the same image and secret as the single-process CronJob
    single = yaml.safe_load((ROOT / "deploy" / "cronjob.yaml").read_text())
    sc = single["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == sc["image"] and c["envFrom"] == sc["envFrom"]
    _known_to_kubernetes(cron, "V1CronJob")  # no misspelt field that the API server would drop


def _known_to_kubernetes(data: dict, klass: str) -> None:
    """Every key is a field of the official client's model of that kind, recursively."""
    import kubernetes.client.models as models

    cls = getattr(models, klass)
    fields = {v: k for k, v in cls.attribute_map.items()}
    for key, value in data.items():
        assert key in fields, f"{klass} has no field {key!r}"
        typ = cls.openapi_types[fields[key]]
        if isinstance(value, dict) and typ.startswith("V1"):
            _known_to_kubernetes(value, typ)
        elif isinstance(value, list) and typ.startswith("list[V1"):
            for item in value:
                _known_to_kubernetes(item, typ[len("list["):-1])


def test_deployment_takes_the_polar_webhook_secret_from_the_secret_optionally():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "deployment.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["POLAR_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "billing-bot", "key": "POLAR_WEBHOOK_SECRET", "optional": True}
    assert "value" not in env["POLAR_WEBHOOK_SECRET"]  # never a literal secret in the manifest
    assert "/polar/webhooks" in (ROOT / "deploy" / "deployment.yaml").read_text()

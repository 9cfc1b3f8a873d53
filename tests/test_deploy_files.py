"""The Slack manifest, the Kubernetes files, the Dockerfile: they parse, they are valid against the
Kubernetes API's schemas (the official client's models, strictly: an unknown or misspelt field
fails), and they say what the bot needs and no more (read-only RBAC, the Slack scopes the code uses)."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml

from services.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


# --- Kubernetes OpenAPI validation (the client's generated models) ---------------------------------

API_VERSIONS = {
    "Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "ServiceAccount": "v1", "Secret": "v1",
    "Deployment": "apps/v1", "PodDisruptionBudget": "policy/v1", "Ingress": "networking.k8s.io/v1",
    "CronJob": "batch/v1", "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
}
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "date": str, "datetime": str}


def schema_errors(data, type_name: str, path: str = "") -> list[str]:
    """Every field not in the model's schema, or of the wrong shape, with its path."""
    m = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if m:
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in schema_errors(item, m.group(1), f"{path}[{i}]")]
    m = re.fullmatch(r"[Dd]ict[\[(]str, (.+)[\])]", type_name)
    if m:
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping, got {type(data).__name__}"]
        return [e for k, v in data.items() for e in schema_errors(v, m.group(1), f"{path}.{k}")]
    if type_name == "object":  # IntOrString, quantities, raw JSON
        return []
    if type_name in _PRIMITIVES:
        ok = isinstance(data, _PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    model = getattr(k8s, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} mapping, got {data!r}"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field in {type_name}")
        elif value is not None:
            errors.extend(schema_errors(value, model.openapi_types[by_json[key]], f"{path}.{key}"))
    return errors


def validate(doc: dict):
    """The model instance, after the strict field check and the models' own required-field checks."""
    kind = doc.get("kind")
    assert kind in API_VERSIONS, f"no schema known for kind {kind!r}"
    assert doc.get("apiVersion") == API_VERSIONS[kind], f"{kind}: apiVersion {doc.get('apiVersion')!r}"
    model = f"V1{kind}"
    errors = schema_errors(doc, model, kind)
    assert errors == [], errors
    return k8s.ApiClient()._ApiClient__deserialize(doc, model)  # raises ValueError on a missing required field


@pytest.mark.parametrize("name,doc", manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_every_manifest_is_valid_against_the_kubernetes_schema(name, doc):
    obj = validate(doc)
    assert obj.metadata.name


def test_the_validator_catches_misspelt_fields_wrong_shapes_and_missing_required_ones():
    dep = of_kind("Deployment")[0]
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["replica"] = 2
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/livez"
    bad["spec"]["template"]["spec"]["containers"][0]["ports"] = {"name": "http"}
    errors = schema_errors(bad, "V1Deployment", "Deployment")
    assert "Deployment.spec.replica: unknown field in V1DeploymentSpec" in errors
    assert any(e.endswith(".httpGet.pth: unknown field in V1HTTPGetAction") for e in errors)
    assert any(e.endswith(".ports: expected a list, got dict") for e in errors)
    missing = yaml.safe_load(yaml.safe_dump(dep))
    del missing["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        validate(missing)


# --- what the files say ----------------------------------------------------------------------------

def test_rbac_is_read_only():
    docs = list(yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()))
    verbs = {v for d in docs if d["kind"] == "Role" for rule in d["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list"}
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"} == {"orzbob-instances", "orzbob-system"}


def test_everything_lives_in_the_billing_bot_namespace_which_is_defined():
    assert [d["metadata"]["name"] for d in of_kind("Namespace")] == ["billing-bot"]
    for _, d in manifests():
        if d["kind"] in ("Namespace", "Role", "RoleBinding"):
            continue
        assert d["metadata"]["namespace"] == "billing-bot", d["kind"]


def _containers():
    dep = of_kind("Deployment")[0]
    cron = of_kind("CronJob")[0]
    return dep, dep["spec"]["template"]["spec"]["containers"][0], \
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def test_images_are_pinned_to_the_release():
    _, serve, reconcile = _containers()
    for c in (serve, reconcile):
        assert c["image"] == f"ghcr.io/orzbob/billing-bot:{VERSION}"
        assert not c["image"].endswith(":latest")
    assert reconcile["args"] == ["reconcile", "--post"]


def test_two_replicas_a_disruption_budget_and_probes_that_mean_something():
    dep, c, _ = _containers()
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = of_kind("PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"] == dep["spec"]["selector"] and pdb["spec"]["minAvailable"] == 1
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"  # never the database
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the database, and draining
    assert c["envFrom"][0]["secretRef"]["name"] == "billing-bot"
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 5 + 20  # the preStop pause, then serve's shutdown (drain bound + closing)


def test_ingress_routes_slack_and_polar_to_the_service_and_nothing_else():
    ing = of_kind("Ingress")[0]
    svc = of_kind("Service")[0]
    dep, c, _ = _containers()
    paths = {p["path"]: p for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]}
    assert set(paths) == {"/slack/events", "/polar/webhooks"}
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for p in paths.values():
        assert p["pathType"] == "Exact"
        assert p["backend"]["service"]["name"] == svc["metadata"]["name"]
        assert p["backend"]["service"]["port"]["name"] in svc_ports
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text())
    slack_host = manifest["settings"]["interactivity"]["request_url"].split("/")[2]
    assert slack_host in {rule["host"] for rule in ing["spec"]["rules"]}


def test_the_configmap_config_is_valid():
    cm = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "billing-bot-config")
    config = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.channels["alerts"]


def test_the_production_image_has_no_embedded_postgresql_and_probes_liveness():
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all(re.search(r"pip install [^\[]* \.$", line) for line in installs), installs
    assert "find_spec('pgserver') is not None" in dockerfile  # the build fails if it slipped in
    assert "/livez" in dockerfile and "/healthz" not in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("pgserver") for d in project["dependencies"])
    assert any(d.startswith("pgserver") for d in project["optional-dependencies"]["demo"])
    assert any(d.startswith("pgserver") for d in project["optional-dependencies"]["test"])
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".billing-bot", "tests", "bench", "**/__pycache__"} <= ignored


def test_pgserver_is_imported_only_when_the_demo_runs():
    """The production image has no pgserver: nothing may import it at module level."""
    for path in list((ROOT / "bot").rglob("*.py")) + list((ROOT / "services").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; services/embedded.py imports it inside a function
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            assert not any(n and n.split(".")[0] == "pgserver" for n in names), path


# --- the Slack manifest ------------------------------------------------------------------------------

def test_manifest_declares_commands_interactivity_home_and_scopes():
    m = yaml.safe_load((ROOT / "manifest.yml").read_text())
    assert {c["command"] for c in m["features"]["slash_commands"]} == {"/billing-check", "/billing-remediate", "/billing-report",
                                                                       "/billing-watch"}
    assert all(c["url"].endswith("/slack/events") for c in m["features"]["slash_commands"])
    assert m["settings"]["interactivity"]["is_enabled"] and m["features"]["app_home"]["home_tab_enabled"]
    assert {"commands", "chat:write", "usergroups:read"} <= set(m["oauth_config"]["scopes"]["bot"])
    assert "app_home_opened" in m["settings"]["event_subscriptions"]["bot_events"]


# The Web API methods the code may call, with the scopes that allow each (any one of them; none for
# methods that need none). A method the code calls that is missing here fails the test below: add it
# with its scopes from https://api.slack.com/methods/<method> and the manifest with them.
METHOD_SCOPES: dict[str, tuple[str, ...]] = {
    "chat.postMessage": ("chat:write",),
    "chat.postEphemeral": ("chat:write",),
    "chat.update": ("chat:write",),
    "chat.delete": ("chat:write",),
    "chat.getPermalink": (),
    "views.open": (),
    "views.publish": (),
    "views.update": (),
    "views.push": (),
    "usergroups.users.list": ("usergroups:read",),
    "usergroups.list": ("usergroups:read",),
    "conversations.open": ("im:write", "mpim:write", "channels:manage", "groups:write"),
    "conversations.info": ("channels:read", "groups:read", "im:read", "mpim:read"),
    "conversations.join": ("channels:join",),
    "users.info": ("users:read",),
    "users.lookupByEmail": ("users:read.email",),
    "files.upload": ("files:write",),
    "files.getUploadURLExternal": ("files:write",),
    "files.completeUploadExternal": ("files:write",),
    "reactions.add": ("reactions:write",),
    "auth.test": (),
}
# slack_sdk's helpers that make several Web API calls (and are not one method themselves).
COMPOSITE_METHODS: dict[str, tuple[str, ...]] = {
    # the external upload: a URL, a POST of the bytes to it (no Web API method), the completion
    "files_upload_v2": ("files.getUploadURLExternal", "files.completeUploadExternal"),
}
# Scopes no Web API call of ours needs, and why the app still has them.
NOT_FROM_CALLS = {
    "commands": "the slash commands",
    "chat:write.public": "posting in the escalation, engineering and alerts channels without an invite",
}


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


def web_api_methods() -> set[str]:
    from slack_sdk.web.async_client import AsyncWebClient

    return {name for name in dir(AsyncWebClient) if not name.startswith("_") and "_" in name
            and name not in ("api_call", "default_params")}


def slack_calls() -> dict[str, list[str]]:
    """Web API method (dotted) -> where the code calls it: `<anything>.chat_postMessage(`,
    `api_call("chat.postMessage")`, and Bolt's `say(` (chat.postMessage)."""
    methods = web_api_methods()
    found: dict[str, list[str]] = {}
    files = [p for d in ("bot", "services", "handlers") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in COMPOSITE_METHODS:
                for dotted in COMPOSITE_METHODS[f.attr]:
                    found.setdefault(dotted, []).append(where)
                continue
            if isinstance(f, ast.Attribute) and f.attr in methods:
                dotted = _dotted(f.attr)
            elif isinstance(f, ast.Attribute) and f.attr == "api_call" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                dotted = node.args[0].value
            elif isinstance(f, ast.Name) and f.id == "say":
                dotted = "chat.postMessage"
            else:
                continue
            found.setdefault(dotted, []).append(where)
    return found


def _dotted(attr: str) -> str:
    """chat_postMessage -> chat.postMessage, usergroups_users_list -> usergroups.users.list."""
    from slack_sdk.web.async_client import AsyncWebClient
    import inspect

    src = inspect.getsource(getattr(AsyncWebClient, attr))
    m = re.search(r'api_call\(\s*"([\w.]+)"', src)
    return m.group(1) if m else attr.replace("_", ".")


def test_every_slack_method_the_code_calls_is_covered_by_a_scope_and_no_scope_is_unused():
    scopes = set(yaml.safe_load((ROOT / "manifest.yml").read_text())["oauth_config"]["scopes"]["bot"])
    calls = slack_calls()
    assert {"chat.postMessage", "chat.update", "views.open", "usergroups.users.list"} <= set(calls)  # it found them
    unknown = {m: w for m, w in calls.items() if m not in METHOD_SCOPES}
    assert unknown == {}, f"add these methods and their scopes to METHOD_SCOPES (and manifest.yml): {unknown}"
    uncovered = {m: METHOD_SCOPES[m] for m in calls if METHOD_SCOPES[m] and not set(METHOD_SCOPES[m]) & scopes}
    assert uncovered == {}, f"manifest.yml lacks a scope for: {uncovered} (called at {[calls[m] for m in uncovered]})"
    needed = {s for m in calls for s in METHOD_SCOPES[m] if s in scopes} | set(NOT_FROM_CALLS)
    assert scopes - needed == set(), f"manifest.yml asks for scopes nothing uses: {scopes - needed}"


def test_the_scope_check_sees_a_call_it_does_not_know():
    """The parser finds client method calls however the client is named."""
    code = "async def f(ctx, client):\n    await ctx.client.users_info(user='U1')\n    await client.chat_postMessage()\n"
    tree = ast.parse(code)
    methods = web_api_methods()
    seen = {_dotted(n.func.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in methods}
    assert seen == {"users.info", "chat.postMessage"}


def test_the_csv_upload_is_seen_as_its_two_web_api_calls_and_needs_files_write():
    calls = slack_calls()
    assert {"files.getUploadURLExternal", "files.completeUploadExternal"} <= set(calls)
    assert "files.upload.v2" not in calls and "files.upload" not in calls  # the retired method is not used
    assert "files:write" in yaml.safe_load((ROOT / "manifest.yml").read_text())["oauth_config"]["scopes"]["bot"]

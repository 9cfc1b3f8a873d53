"""The layers import downward only: bot/ -> services/ -> handlers/ (and templates/, which renders
for both). Every module is parsed, imports inside functions included; an upward import fails the
test, naming the file, the line and the import."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what each layer must never import
FORBIDDEN = {"handlers": ("services", "bot"), "services": ("bot",), "templates": ("services", "bot")}


def imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: stays inside its package
            continue


def test_imports_point_downward_only():
    upward = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, module in imports(path):
                if module.split(".")[0] in banned:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == [], "imports pointing up a layer:\n" + "\n".join(upward)


def test_the_boundary_test_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bot.app import serve\n")
    assert list(imports(bad)) == [(2, "bot.app")]


def test_only_the_store_writes_sql_on_the_bots_tables():
    """The store is the only module with SQL on the bot's own tables (its schema placeholder)."""
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "bot").rglob("*.py")):
        if path.name in ("store.py",):
            continue
        text = path.read_text()
        for table in ("cases", "case_events", "case_pieces", "issuances", "polar_webhook_deliveries",
                      "reconcile_runs", "reconcile_kind_customers", "reconcile_customer_kinds", "case_transitions"):
            if any(f"{{{name}}}.{table}" in text for name in ("s", "self.s", "schema", "db.schema", "self.schema")):
                offenders.append(f"{path.relative_to(ROOT)}: {table}")
    assert offenders == [], offenders

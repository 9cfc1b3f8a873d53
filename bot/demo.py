"""`billing-bot demo`: the cases of the demo instances, on the embedded database."""
from __future__ import annotations

from bot.runtime import open_runtime
from services.config import Config, Env
from services.demo_data import DEMO_INSTANCES
from templates import render


async def run_demo(env: Env, config: Config) -> int:
    async with open_runtime(env, config) as rt:
        where = "the embedded demo database" if rt.embedded else "DATABASE_URL"
        print(f"billing-bot demo on {where}.")
        print("No Kubernetes cluster and no Polar account are connected in the demo: the cases below use the "
              "database alone, and their 'Sources' line says so.\n")
        for instance_id, story in DEMO_INSTANCES.items():
            print("=" * 100)
            print(f"{instance_id}: {story}")
            print("=" * 100)
            report = await rt.investigator.check(instance_id)
            print(render("report.txt.j2", report=report, level_text=config.level_label(report.result.required_level)))
    return 0

"""Wiring: turn the environment and the config file into connected services, and close them."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from services.config import Config, Env
from services.embedded import database_url
from services.db import Database

if TYPE_CHECKING:  # loaded in open_runtime: `reconcile` and `report` never need these clients
    from services.investigation import Investigator
    from services.kube import KubeSource
    from services.polar import PolarClient

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    env: Env
    config: Config
    db: Database
    investigator: Investigator
    kube: KubeSource | None
    polar: PolarClient | None
    embedded: object | None = None  # the pgserver handle when the database is the embedded demo


@asynccontextmanager
async def open_runtime(env: Env, config: Config) -> AsyncIterator[Runtime]:
    from services.investigation import Investigator
    from services.kube import KubeNotConfigured, KubeSource, api_client, describe_error
    from services.polar import PolarClient

    url, embedded = database_url(env)
    # the pool of 8 (checks, Slack's listeners) and the issuing workers' own (workers + 1)
    db = await Database.connect(url, config.bot_schema, issuing_workers=env.issuing_workers)
    kube = None
    kube_problem = None
    try:
        kube = KubeSource(api_client(env), config.kubernetes)
    except KubeNotConfigured as exc:
        kube_problem = str(exc)
    except Exception as exc:  # a broken kubeconfig: say so, go on without the cluster
        kube_problem = f"failed: cannot load kube config: {describe_error(exc)}"
    polar = None
    polar_problem = None
    if env.polar_api_key or env.polar_api_url_set:
        polar = PolarClient(env.polar_api_url, env.polar_api_key, api_version=config.polar.api_version)
    else:
        polar_problem = "not configured (no POLAR_API_KEY)"
    inv = Investigator(config, db, kube=kube, kube_problem=kube_problem, polar=polar, polar_problem=polar_problem)
    try:
        yield Runtime(env, config, db, inv, kube, polar, embedded)
    finally:
        await db.close()
        if kube is not None:
            kube.close()
        if polar is not None:
            await polar.close()

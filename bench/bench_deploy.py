"""A deploy when nothing changed, end to end, against the first deploy of the same site.

``Pipeline.deploy`` of the example ZEO site (real git mirror, real offline buildout): once
to build the first release, then N times with nothing changed, each with a fresh
``Pipeline`` as the daemon makes one per command. A no-op is fetch + resolve + render +
decide; a bare ``git fetch`` of the mirror is timed alongside to show its share.

Run: ``.venv/bin/python bench/bench_deploy.py [N]``; ``bench/run.py`` imports ``main()``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import ms, percentile, quiet_logs

# isort: split
from support.site import SiteRepo, write_config

from agent.adapters.host import HostFacts
from agent.core.config import AgentConfig
from agent.node.pipeline import Pipeline

APP = "zeo-site"


async def _timed_deploy(config: AgentConfig, facts: HostFacts) -> tuple[float, str]:
    started = time.perf_counter()
    outcome = await Pipeline(config, facts=facts).deploy(APP)
    seconds = time.perf_counter() - started
    if outcome.status == "failed":
        raise RuntimeError(f"deploy failed: {outcome.message}")
    return seconds, outcome.status


async def _measure(config: AgentConfig, repetitions: int) -> dict[str, Any]:
    facts = HostFacts.probe()
    first_s, first_status = await _timed_deploy(config, facts)
    if first_status != "succeeded":
        raise RuntimeError(f"first deploy was {first_status}, expected a new release")
    manager = Pipeline(config, facts=facts).manager(APP)
    noop: list[float] = []
    fetch: list[float] = []
    for _ in range(repetitions):  # interleaved, so load changes hit both series alike
        seconds, status = await _timed_deploy(config, facts)
        if status != "unchanged":
            raise RuntimeError(f"a deploy with nothing changed was {status}")
        noop.append(seconds)
        started = time.perf_counter()
        await asyncio.to_thread(manager.fetch)
        fetch.append(time.perf_counter() - started)
    return {
        "repetitions": repetitions,
        "first_deploy_s": round(first_s, 2),
        "noop_median_ms": ms(statistics.median(noop)),
        "noop_p90_ms": ms(percentile(noop, 90)),
        "noop_min_ms": ms(min(noop)),
        "fetch_median_ms": ms(statistics.median(fetch)),
        "first_over_noop": round(first_s / statistics.median(noop), 1),
    }


def main(repetitions: int = 20) -> dict[str, Any]:
    """Build the example site once, then time ``repetitions`` no-op deploys."""
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        base = Path(tmp)
        repo = SiteRepo.create(base)
        config = write_config(base, repo)
        return asyncio.run(_measure(config, repetitions))


if __name__ == "__main__":
    quiet_logs()
    for key, value in main(*(int(arg) for arg in sys.argv[1:2])).items():
        print(f"{key:22} {value}")

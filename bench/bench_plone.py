"""A config-only deploy of the real Plone example, phase by phase: the bootstrap built in
every release (``reuse_bootstrap: false``, the old way) against the shared one.

Two agents side by side, each with its own root, deploy ``examples/plone-site`` (copied
into a git repository) through ``Pipeline`` with ``--local`` semantics and no supervisor
(restart skipped). Both first deploy it once (not timed: eggs come from the cache), then
``rounds`` times each, interleaved, a configuration-only change
(``stack_config.plone_instances.zodb_cache_size``) is timed phase by phase: the pipeline's
phases (through its progress port) and the runner's ``buildout.step`` and
``bootstrap.ready`` log events, all stamped on arrival with ``time.monotonic()``.

The eggs and downloads come from ``$DEPLOY_AGENT_PLONE_CACHE`` (default
``/root/.cache/buildout-deploy-agent``; CI keeps it): ``shared/eggs`` and
``shared/downloads`` of both roots are symlinks to it, made before the first deploy, so
nothing is downloaded again once the cache is warm (a cold cache is filled by the first
deploy, 5-15 minutes). The bootstrap is the example's own: ``python3 -m venv .`` and
``bin/pip install -r requirements.txt`` (pip's cache as the machine has it).

Run: ``.venv/bin/python bench/bench_plone.py [ROUNDS]``; ``bench/run.py`` imports ``main()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import structlog
import yaml
from bench_common import quiet_logs

# isort: split
from support.plone import CACHE as plone_cache_dir
from support.plone import plone_app, plone_repository, shared_caches
from support.ports import free_port_block

from agent.adapters.configfile import load_config
from agent.adapters.host import HostFacts
from agent.core.config import AgentConfig
from agent.node.pipeline import Pipeline

APP = "plone"
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"
FACTS = HostFacts(cpu_count=1, memory_mb=4096)
#: Phases of one deploy, as (label, start mark, end mark); marks are named below.
PHASES = (
    ("fetch+render+decide", "begin", "checkout"),
    ("checkout+deploy.cfg", "checkout", "build"),
    ("bootstrap", "build", "buildout"),
    ("buildout", "buildout", "built"),
    ("switch+restart+prune", "built", "end"),
)
MODES = {"old": False, "reused": True}


class Recorder:
    """Stamps the pipeline's phases and the runner's step events on arrival."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    async def phase(self, name: str, status: str, message: str, details: Mapping[str, Any]) -> None:
        if (name, status) == ("checkout", "started"):
            self.mark("checkout")
        elif (name, status) == ("buildout", "started"):
            self.mark("build")
        elif (name, status) == ("buildout", "done"):
            self.mark("built")

    def log(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        if event.get("event") == "buildout.step.started" and event.get("step") == "buildout":
            self.mark("buildout")
        raise structlog.DropEvent


def _repository(base: Path) -> Path:
    return plone_repository(base).bare


def _config(base: Path, bare: Path, *, reuse: bool) -> AgentConfig:
    root = base / "srv"
    shared_caches(root / APP)
    data: dict[str, Any] = {
        "stack": "bench",
        "instance": {
            "id": "web-1",
            "address": "127.0.0.1",
            "layers": ["plone_instances", "zeoserver"],
        },
        "paths": {"root": str(root), "state": str(base / "state")},
        "apps": {
            APP: {
                **plone_app(bare, python=PYTHON, reuse_bootstrap=reuse),
                "keep_releases": 3,
            }
        },
        "stack_config": {
            "plone_instances": {
                "instance_count": 2,
                "base_port": free_port_block(2),
                "zeo": {"address": f"127.0.0.1:{free_port_block(1) + 1}"},
                "zodb_cache_size": 30000,
            }
        },
    }
    path = base / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def _with_cache_size(config: AgentConfig, size: int) -> AgentConfig:
    plone = {**config.stack_config["plone_instances"], "zodb_cache_size": size}
    stack = {**config.stack_config, "plone_instances": plone}
    return config.model_copy(update={"stack_config": stack})


def _disk_mb(path: Path) -> float:
    """Bytes of the files under ``path``, symlinks not followed."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with_path = os.path.join(folder, name)
            if not os.path.islink(with_path):
                total += os.stat(with_path).st_size
    return round(total / 1e6, 1)


async def _deploy(config: AgentConfig, expected: str) -> tuple[dict[str, float], Path]:
    recorder = Recorder()
    previous = structlog.get_config()
    structlog.configure(
        processors=[recorder.log],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    try:
        recorder.mark("begin")
        outcome = await Pipeline(config, facts=FACTS).deploy(APP, progress=recorder)
        recorder.mark("end")
    finally:
        structlog.configure(**previous)
    if outcome.status != "succeeded" or outcome.decision != expected:
        raise RuntimeError(f"{expected} deploy: {outcome.status} {outcome.message}")
    marks = recorder.marks
    phases = {label: marks[end] - marks[start] for label, start, end in PHASES}
    phases["build phase"] = marks["built"] - marks["checkout"]
    phases["total"] = marks["end"] - marks["begin"]
    assert outcome.release is not None
    return phases, config.paths.root / APP / "releases" / outcome.release


async def _measure(base: Path, rounds: int) -> dict[str, Any]:
    bare = _repository(base)
    configs = {mode: _config(base / mode, bare, reuse=reuse) for mode, reuse in MODES.items()}
    first: dict[str, float] = {}
    for mode, config in configs.items():
        phases, _ = await _deploy(config, "new-revision")
        first[mode] = phases["total"]
    samples: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    sizes: dict[str, float] = {}
    for number in range(rounds):  # interleaved, so load changes hit both series alike
        for mode, config in configs.items():
            phases, release = await _deploy(
                _with_cache_size(config, 20000 + number), "config-changed"
            )
            for label, seconds in phases.items():
                samples[mode].setdefault(label, []).append(seconds)
            sizes[mode] = _disk_mb(release)
    medians = {
        mode: {label: round(statistics.median(v), 2) for label, v in series.items()}
        for mode, series in samples.items()
    }
    old, new = medians["old"], medians["reused"]
    return {
        "rounds": rounds,
        "python": PYTHON,
        "cache": str(plone_cache_dir),
        "first_deploy_s": {mode: round(s, 1) for mode, s in first.items()},
        "phases_s": medians,
        "release_mb": sizes,
        "old_build_s": old["build phase"],
        "reused_build_s": new["build phase"],
        "build_ratio": round(new["build phase"] / old["build phase"], 3),
        "old_bootstrap_s": old["bootstrap"],
        "reused_bootstrap_s": new["bootstrap"],
        "old_total_s": old["total"],
        "reused_total_s": new["total"],
        "old_release_mb": sizes["old"],
        "reused_release_mb": sizes["reused"],
    }


def table(figures: Mapping[str, Any]) -> str:
    """Phase by phase, old beside reused, with the ratio."""
    old, new = figures["phases_s"]["old"], figures["phases_s"]["reused"]
    lines = ["| phase | old bootstrap (s) | reused (s) | reused/old |", "|---|---:|---:|---:|"]
    for label in [*(p[0] for p in PHASES), "build phase", "total"]:
        ratio = f"{new[label] / old[label]:.2f}" if old[label] else "n/a"
        lines.append(f"| {label} | {old[label]:.2f} | {new[label]:.2f} | {ratio} |")
    lines.append(
        f"| release on disk (MB) | {figures['old_release_mb']} | {figures['reused_release_mb']} | |"
    )
    return "\n".join(lines)


def main(rounds: int = 2) -> dict[str, Any]:
    """Two roots, one first deploy each, then ``rounds`` config-only deploys each."""
    with tempfile.TemporaryDirectory(prefix="bench-plone-") as tmp:
        return asyncio.run(_measure(Path(tmp), rounds))


if __name__ == "__main__":
    quiet_logs()
    result = main(*(int(arg) for arg in sys.argv[1:2]))
    print(table(result))
    print(
        f"\nbuild phase (checkout + deploy.cfg + bootstrap + buildout), median of "
        f"{result['rounds']}: reused {result['reused_build_s']} s = "
        f"{result['build_ratio'] * 100:.0f} % of old {result['old_build_s']} s"
    )

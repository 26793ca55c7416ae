"""Run every benchmark in one go, print one table, write ``bench/results.json``.

    .venv/bin/python bench/run.py                 # all, full sizes (a few minutes)
    .venv/bin/python bench/run.py --quick         # smaller N, for a smoke run
    .venv/bin/python bench/run.py --only latency --only fanout

Every figure is measured in this run, side by side on the same machine: ratios compare
series that ran interleaved, never numbers from different days. docs/benchmarks.md keeps
the table of a full run and how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bench_agent
import bench_deploy
import bench_fanout
import bench_plone
import bench_releases
import bench_restart
import psutil
from bench_common import ROOT, quiet_logs

RESULTS = ROOT / "bench" / "results.json"


@dataclass(frozen=True)
class Bench:
    """One benchmark: how to run it at full and at quick size."""

    run: Callable[..., dict[str, Any]]
    full: dict[str, Any]
    quick: dict[str, Any]


def _silently(function: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """bench_restart prints its own summary; the table says it again."""

    def run(**kwargs: Any) -> dict[str, Any]:
        with contextlib.redirect_stdout(io.StringIO()):
            return function(**kwargs)

    return run


BENCHES: dict[str, Bench] = {
    "deploy": Bench(bench_deploy.main, {"repetitions": 20}, {"repetitions": 5}),
    "releases": Bench(bench_releases.main, {"repetitions": 5}, {"repetitions": 2}),
    "restart": Bench(_silently(bench_restart.main), {"n": 4, "rounds": 5}, {"n": 3, "rounds": 2}),
    "latency": Bench(bench_agent.latency, {"commands": 50}, {"commands": 10}),
    "fanout": Bench(bench_fanout.main, {"agents": 300, "rounds": 5}, {"agents": 100, "rounds": 2}),
    "idle": Bench(bench_agent.idle, {"window": 30.0}, {"window": 10.0}),
    "plone": Bench(bench_plone.main, {"rounds": 2}, {"rounds": 1}),
}


@dataclass(frozen=True)
class Row:
    """One line of the table: ``notes`` is a format string over the bench's figures."""

    bench: str
    name: str
    key: str
    unit: str
    notes: str
    scale: float = 1.0


ROWS: list[Row] = [
    Row(
        "deploy",
        "no-op deploy (fetch+render+decide)",
        "noop_median_ms",
        "ms",
        "median of {repetitions}; p90 {noop_p90_ms} ms; git fetch alone {fetch_median_ms} ms",
    ),
    Row(
        "deploy",
        "first deploy (checkout+buildout)",
        "first_deploy_s",
        "s",
        "example zeo-site, offline buildout; {first_over_noop}x a no-op",
    ),
    Row(
        "releases",
        "release from mirror",
        "release_from_mirror_median_s",
        "s",
        "{files} files, {commits} commits, {pack_mb} MB pack; median of {repetitions}",
    ),
    Row(
        "releases",
        "fresh git clone (file://)",
        "fresh_file_clone_median_s",
        "s",
        "same repository, same {repetitions} rounds, interleaved",
    ),
    Row(
        "releases",
        "release vs fresh clone",
        "speedup_release_vs_fresh_clone",
        "x",
        "objects only (--no-checkout): {speedup_objects_only}x",
    ),
    Row(
        "releases",
        "no-op mirror fetch",
        "fetch_noop_median_s",
        "ms",
        "git fetch with nothing new",
        scale=1000,
    ),
    Row(
        "restart",
        "rolling restart overhead/client",
        "overhead_per_program",
        "ms",
        "beyond raw stop+start ({raw_start_ms} ms/client), delay 0; {programs} clients, "
        "median of {rounds}",
        scale=1000,
    ),
    Row(
        "latency",
        "publish -> received (p50)",
        "received_p50_ms",
        "ms",
        "real agent, {commands} no-op deploys; agent had it at {accepted_p50_ms} ms",
    ),
    Row(
        "latency", "publish -> received (p99)", "received_p99_ms", "ms", "max {received_max_ms} ms"
    ),
    Row(
        "latency",
        "publish -> first progress (p50)",
        "progress_p50_ms",
        "ms",
        "p99 {progress_p99_ms} ms; worker started the fetch",
    ),
    Row(
        "latency",
        "publish -> result, no-op (p50)",
        "result_p50_ms",
        "ms",
        "p99 {result_p99_ms} ms; agent built it at {done_p50_ms} ms",
    ),
    Row(
        "fanout",
        "fan-out: results p50",
        "p50_ms",
        "ms",
        "{agents} agents in one process; median of {rounds} commands",
    ),
    Row("fanout", "fan-out: results p99", "p99_ms", "ms", "first result at {min_ms} ms"),
    Row(
        "fanout",
        "fan-out: all results (max)",
        "max_ms",
        "ms",
        "fleet CPU {fleet_cpu_per_agent_ms} ms/agent; broker CPU {broker_cpu_ms} ms",
    ),
    Row(
        "idle",
        "idle agent RSS",
        "rss_mb",
        "MiB",
        "USS {uss_mb} MiB; after one deploy, settled {settle_s} s; {threads} threads",
    ),
    Row(
        "idle",
        "idle agent CPU",
        "cpu_percent",
        "%",
        "{cpu_seconds} CPU s in {window_s} s (10 ms ticks); keepalive 30 s",
    ),
    Row(
        "plone",
        "Plone config-only build, old bootstrap",
        "old_build_s",
        "s",
        "checkout+deploy.cfg+bootstrap+buildout, venv per release: bootstrap "
        "{old_bootstrap_s} s; median of {rounds}",
    ),
    Row(
        "plone",
        "Plone config-only build, reused",
        "reused_build_s",
        "s",
        "shared venv linked in {reused_bootstrap_s} s; release {reused_release_mb} MB "
        "(old {old_release_mb} MB)",
    ),
    Row(
        "plone",
        "Plone build phase reused/old",
        "build_ratio",
        "x",
        "target <= 0.40; whole deploy {reused_total_s} s vs {old_total_s} s, no supervisor",
    ),
]


def rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for row in ROWS:
        figures = results.get(row.bench)
        if figures is None:
            continue
        if "error" in figures:
            table.append(
                {
                    "name": row.name,
                    "figure": None,
                    "unit": row.unit,
                    "notes": f"FAILED: {figures['error']}",
                }
            )
            continue
        notes = row.notes.format(**figures, **_derived(figures))
        table.append(
            {
                "name": row.name,
                "figure": round(figures[row.key] * row.scale, 3),
                "unit": row.unit,
                "notes": notes,
            }
        )
    return table


def _derived(figures: dict[str, Any]) -> dict[str, Any]:
    """Seconds from the older benchmarks as milliseconds, for the notes."""
    return {
        f"{key}_ms": round(value * 1000, 1)
        for key, value in figures.items()
        if isinstance(value, float) and not key.endswith(("_ms", "_s", "_mb"))
    }


def render(table: list[dict[str, Any]]) -> str:
    """A Markdown table: readable in a terminal and pasteable into the docs."""
    lines = ["| name | figure | unit | notes |", "|---|---:|---|---|"]
    for row in table:
        figure = "n/a" if row["figure"] is None else f"{row['figure']:g}"
        lines.append(f"| {row['name']} | {figure} | {row['unit']} | {row['notes']} |")
    return "\n".join(lines)


def _version(argv: list[str], pattern: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not found"
    found = re.search(pattern, proc.stdout + proc.stderr)
    return found.group(1) if found else "unknown"


def machine() -> dict[str, Any]:
    mosquitto = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": _version([mosquitto or "mosquitto", "-h"], r"version (\S+)"),
        "git": _version(["git", "--version"], r"git version (\S+)"),
    }


def run_all(names: list[str], quick: bool) -> dict[str, dict[str, Any]]:
    """Each benchmark in turn; a failure is recorded in its row and the others still run."""
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        bench = BENCHES[name]
        print(f"running {name}...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            results[name] = bench.run(**(bench.quick if quick else bench.full))
        except Exception as exc:  # a broken benchmark must not hide the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["bench_seconds"] = round(time.monotonic() - started, 1)
        print(f"  {name} took {results[name]['bench_seconds']} s", file=sys.stderr, flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N everywhere")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHES),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHES)}",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    names = [n for n in BENCHES if not args.only or n in args.only]
    started = time.monotonic()
    host = machine()
    results = run_all(names, args.quick)
    table = rows(results)
    print(render(table))
    command = " ".join([".venv/bin/python bench/run.py", *(argv or sys.argv[1:])])
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "total_seconds": round(time.monotonic() - started, 1),
        "machine": host | {"load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "table": table,
        "benchmarks": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{len(names)} benchmarks in {report['total_seconds']} s; wrote {args.output}",
        file=sys.stderr,
    )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

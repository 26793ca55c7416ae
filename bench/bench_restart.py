"""What does the health-gated rolling restart cost beyond the programs' own restart time?

Runs N tiny HTTP programs under a private supervisord. The baseline restarts each one by
hand through XML-RPC (stopProcess, startProcess, then a tight 5 ms HTTP poll until it
answers), so it is the programs' own stop+start time. Then ``restart_programs`` does the
same rolling restart with ``restart_delay=0``; the difference, per program, is the agent's
overhead (reloadConfig, polling granularity, thread hops). Prints and returns medians.

    .venv/bin/python bench/bench_restart.py [N] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.supervisord import Supervisord, running_supervisord  # noqa: E402

from agent.adapters.supervisor import SupervisorClient  # noqa: E402
from agent.node.rolling import RestartPlan, restart_programs  # noqa: E402


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
            return 200 <= response.status < 400
    except (OSError, urllib.error.URLError):
        return False


def raw_restart(sv: Supervisord, name: str) -> tuple[float, float]:
    """(stop seconds, start-to-answering seconds) for one program, by hand."""
    started = time.monotonic()
    sv.call("stopProcess", f"{name}:{name}", True)
    stopped = time.monotonic()
    sv.call("startProcess", f"{name}:{name}", False)
    while not _answers(sv.ports[name]):
        time.sleep(0.005)
    return stopped - started, time.monotonic() - stopped


def one_round(sv: Supervisord, names: list[str]) -> dict[str, float]:
    raw = [raw_restart(sv, name) for name in names]
    raw_total = sum(stop + start for stop, start in raw)
    plan = RestartPlan(
        programs=["client*"],
        health_url="http://127.0.0.1:{port}/",
        health_timeout=30,
        ports=sv.ports,
    )
    report = asyncio.run(restart_programs(SupervisorClient(sv.url), plan))
    return {
        "raw_stop": statistics.mean(stop for stop, _ in raw),
        "raw_start": statistics.mean(start for _, start in raw),
        "raw_total": raw_total,
        "roll_total": report.seconds,
        "overhead_per_program": (report.seconds - raw_total) / len(names),
    }


def main(n: int = 4, rounds: int = 3) -> dict[str, Any]:
    names = [f"client{i}" for i in range(1, n + 1)]
    with (
        tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp,
        running_supervisord(Path(tmp)) as sv,
    ):
        for name in names:
            sv.add_program(name)
        sv.reload()
        results = [one_round(sv, names) for _ in range(rounds)]
    summary: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in results), 4) for key in results[0]
    }
    summary.update(programs=n, rounds=rounds)
    print(f"rolling restart of {n} programs, median of {rounds} rounds:")
    print(f"  raw stop per program          {summary['raw_stop'] * 1000:8.1f} ms")
    print(f"  raw start-to-answer/program   {summary['raw_start'] * 1000:8.1f} ms")
    print(f"  raw total                     {summary['raw_total'] * 1000:8.1f} ms")
    print(f"  restart_programs total        {summary['roll_total'] * 1000:8.1f} ms")
    print(f"  overhead per program          {summary['overhead_per_program'] * 1000:8.1f} ms")
    return summary


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))

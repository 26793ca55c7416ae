"""The buildout runner: streamed output, exit status, timeout killing the process group."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
from structlog.testing import capture_logs

from agent.adapters.buildout import run_buildout
from agent.core.errors import BuildoutFailed

PY = sys.executable


async def test_bootstrap_then_buildout_run_in_the_release_dir_with_output_logged(tmp_path):
    with capture_logs() as logs:
        await run_buildout(
            tmp_path,
            bootstrap=[[PY, "-c", "open('boot', 'w').write('1'); print('booted')"]],
            command=[PY, "-c", "import os; print('in', os.getcwd()); print('done')"],
            timeout=30,
        )
    lines = [e["line"] for e in logs if e["event"] == "buildout.line"]
    assert lines == ["booted", f"in {tmp_path}", "done"]
    assert (tmp_path / "boot").exists()


async def test_failure_raises_with_exit_status_and_output_tail(tmp_path):
    script = "import sys\nfor i in range(100): print('line', i)\nsys.exit(3)"
    with pytest.raises(BuildoutFailed) as info:
        await run_buildout(tmp_path, bootstrap=[], command=[PY, "-c", script], timeout=30)
    assert info.value.returncode == 3
    assert info.value.step == "buildout"
    assert info.value.output_tail[-1] == "line 99"
    assert "exit status 3" in str(info.value)


async def test_failed_bootstrap_stops_before_buildout(tmp_path):
    with pytest.raises(BuildoutFailed) as info:
        await run_buildout(
            tmp_path,
            bootstrap=[[PY, "-c", "raise SystemExit(1)"]],
            command=[PY, "-c", "open('ran', 'w')"],
            timeout=30,
        )
    assert info.value.step == "bootstrap[0]"
    assert not (tmp_path / "ran").exists()


async def test_missing_command_is_a_clear_error(tmp_path):
    with pytest.raises(BuildoutFailed, match="cannot run 'bin/buildout'"):
        await run_buildout(tmp_path, bootstrap=[], command=["bin/buildout"], timeout=5)


async def test_timeout_kills_the_whole_process_group(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)'])\n"
        "open('child.pid', 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(BuildoutFailed) as info:
        await run_buildout(tmp_path, bootstrap=[], command=[PY, "-c", script], timeout=2)
    assert info.value.timed_out
    assert time.monotonic() - started < 15
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        proc = psutil.Process(child)
        if proc.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE

"""What only the fault-injection suite needs; the rest (the log follower, the SIGKILL of
a whole process tree, the invariants and the tally) is in the support package.

tests/faults has no __init__.py: this module is imported by name, and tests/ itself is on
sys.path through tests/conftest.py, so ``support`` imports as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

from support.agents import APP, AgentProcess

#: How many kills test_fault_agent_kill.py tries; CI keeps the default.
FAULT_RUNS = int(os.environ.get("FAULT_RUNS", "8"))


def app_dir(agent: AgentProcess) -> Path:
    return agent.directory / "srv" / APP

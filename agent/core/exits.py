"""Exit statuses of every ``deploy-agent`` command, defined once (README, "Exit status")."""

from __future__ import annotations

EXIT_OK = 0  # succeeded, or nothing to do
EXIT_FAILED = 1  # a command failed or was rejected somewhere
EXIT_USAGE = 2  # bad usage or configuration, or no broker (systemd: RestartPreventExitStatus=2)
EXIT_TIMEOUT = 3  # not every targeted instance answered in time
EXIT_NO_INSTANCE = 4  # no instance was targeted

#: Where a command looks for the agent configuration when none is given.
DEFAULT_CONFIG = "/etc/deploy-agent/agent.yaml"

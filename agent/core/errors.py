"""The outcomes a caller must tell apart, each with what an operator needs to act on it.

Adapters translate their library's exceptions into these (chained with ``from exc``), so
the pipeline, the daemon and the CLI never see a GitPython, xmlrpc or OS error raw.
"""

from __future__ import annotations


class AgentError(Exception):
    """Raised for any failure the agent reports as a result rather than a crash."""

    code = "error"


class ConfigError(AgentError):
    """Raised when a configuration file or value is invalid; ``problems`` lists each one."""

    code = "config-error"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)

    def __str__(self) -> str:
        if not self.problems:
            return str(self.args[0])
        return "\n".join([self.args[0], *(f"  - {p}" for p in self.problems)])


class RenderError(AgentError):
    """Raised when a value cannot be written safely into deploy.cfg or a template."""

    code = "render-error"


class GitError(AgentError):
    """Raised when git fails (unreachable remote, corrupt mirror, failed checkout)."""

    code = "git-error"


class RevisionNotFound(GitError):
    """Raised when a branch, tag or sha does not exist in the repository."""

    code = "revision-not-found"


class ReleaseError(AgentError):
    """Raised when a release directory cannot be created, switched to or found."""

    code = "release-error"


class BuildoutFailed(AgentError):
    """Raised when a bootstrap command or buildout exits non-zero or times out."""

    code = "buildout-failed"

    def __init__(
        self,
        message: str,
        *,
        step: str,
        returncode: int | None,
        output_tail: list[str],
        timed_out: bool = False,
    ) -> None:
        self.step = step
        self.returncode = returncode
        self.output_tail = output_tail
        self.timed_out = timed_out
        super().__init__(message)

    def __str__(self) -> str:
        tail = "\n".join(f"    {line}" for line in self.output_tail)
        return f"{self.args[0]}\n  last lines of output:\n{tail}" if tail else self.args[0]


class SupervisorError(AgentError):
    """Raised when supervisord is unreachable, refuses credentials or rejects a call."""

    code = "supervisor-error"


class RestartHalted(AgentError):
    """Raised when a restarted program does not come back healthy; the roll stops there."""

    code = "restart-halted"

    def __init__(self, message: str, *, program: str, restarted: list[str]) -> None:
        self.program = program
        self.restarted = restarted
        super().__init__(message)


class CommandRejected(AgentError):
    """Raised when a command is malformed, unsigned, badly signed, stale or a replay."""

    code = "rejected"


class StateError(AgentError):
    """Raised when the state file or journal cannot be read or written."""

    code = "state-error"

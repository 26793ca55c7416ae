"""The outcomes a caller must tell apart, each with what an operator needs to act on it.

Every error the agent reports is defined here, once, with its ``code`` (the ``error`` field
of a result). Adapters translate their library's exceptions into these (chained with
``from exc``), so the pipeline, the daemon and the CLI never see a GitPython, xmlrpc or OS
error raw.
"""

from __future__ import annotations

from pathlib import Path

#: The code of a result whose command crashed inside the agent (a bug, caught per command).
INTERNAL_ERROR = "internal-error"


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


class ProcessFailed(AgentError):
    """Raised when a subprocess the agent runs exits non-zero or times out; carries its
    return code and the last lines of its output, shown under the message."""

    def __init__(
        self, message: str, *, returncode: int | None, output_tail: list[str], timed_out: bool
    ) -> None:
        self.returncode = returncode
        self.output_tail = output_tail
        self.timed_out = timed_out
        super().__init__(message)

    def __str__(self) -> str:
        tail = "\n".join(f"    {line}" for line in self.output_tail)
        return f"{self.args[0]}\n  last lines of output:\n{tail}" if tail else self.args[0]


class BuildoutFailed(ProcessFailed):
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
        super().__init__(
            message, returncode=returncode, output_tail=output_tail, timed_out=timed_out
        )


class HookFailed(ProcessFailed):
    """Raised when a deploy hook (``before_switch``, ``before_restart``...) exits non-zero,
    cannot be started or times out."""

    code = "hook-failed"

    def __init__(
        self,
        message: str,
        *,
        hook: str,
        step: str,
        returncode: int | None,
        output_tail: list[str],
        timed_out: bool = False,
    ) -> None:
        self.hook = hook
        self.step = step
        super().__init__(
            message, returncode=returncode, output_tail=output_tail, timed_out=timed_out
        )


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


class InvalidMessage(AgentError):
    """Raised when an event, presence, status or config payload is malformed or unsigned."""

    code = "invalid-message"


class StateError(AgentError):
    """Raised when the state file or journal cannot be read or written."""

    code = "state-error"


class SupervisorCallFailed(SupervisorError):
    """Raised when supervisord rejects a call (an xmlrpc Fault such as BAD_NAME)."""

    def __init__(self, message: str, *, method: str, program: str | None, fault: str) -> None:
        self.method = method
        self.program = program
        self.fault = fault
        super().__init__(message)


class ProgramDidNotStart(SupervisorError):
    """Raised when a program cannot be spawned or does not reach RUNNING in time."""

    def __init__(self, message: str, *, program: str, state: str | None = None) -> None:
        self.program = program
        self.state = state
        super().__init__(message)


class HealthCheckFailed(AgentError):
    """Raised when a health URL does not answer 2xx/3xx before its deadline."""

    code = "health-check-failed"

    def __init__(self, message: str, *, url: str, last_error: str) -> None:
        self.url = url
        self.last_error = last_error
        super().__init__(message)


class TemplateReloadFailed(ProcessFailed):
    """Raised when a template's reload command fails or times out; its file is restored."""

    code = "template-reload-failed"

    def __init__(
        self,
        message: str,
        *,
        sources: list[Path],
        argv: list[str],
        returncode: int | None,
        output_tail: list[str],
        timed_out: bool = False,
    ) -> None:
        self.sources = sources
        self.argv = argv
        super().__init__(
            message, returncode=returncode, output_tail=output_tail, timed_out=timed_out
        )


class KeyFileError(ConfigError):
    """Raised when a key file cannot be read, parsed or written (the message names the path)."""

    code = "key-file-error"


class BrokerUnreachable(AgentError):
    """Raised when the broker cannot be reached, refuses the operator or drops the session."""

    code = "broker-unreachable"

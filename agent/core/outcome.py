"""The result of one command for one app on one host: a value, never a raise
(docs/architecture.md, "Outcomes").

Built through the constructors below and changed only by copies (``with_changes``,
``with_details``), so a result that has been reported cannot change under the reporter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent.core.plan import Decision

OutcomeStatus = Literal["succeeded", "failed", "unchanged"]
#: What a command runs as on this host ("configure" when the app's layers are not ours).
RunKind = Literal["deploy", "rollback", "configure", "restart"]


@dataclass(frozen=True, kw_only=True)
class Outcome:
    kind: str
    app: str
    status: OutcomeStatus
    message: str
    decision: Decision | None = None
    revision: str | None = None
    release: str | None = None
    error: str | None = None
    seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @classmethod
    def succeeded(cls, kind: str, app: str, message: str, **fields: Any) -> Outcome:
        return cls(kind=kind, app=app, status="succeeded", message=message, **fields)

    @classmethod
    def unchanged(cls, kind: str, app: str, message: str, **fields: Any) -> Outcome:
        return cls(kind=kind, app=app, status="unchanged", message=message, **fields)

    @classmethod
    def failed(cls, kind: str, app: str, message: str, *, error: str, **fields: Any) -> Outcome:
        return cls(kind=kind, app=app, status="failed", message=message, error=error, **fields)

    def with_changes(self, **changes: Any) -> Outcome:
        return replace(self, **changes)

    def with_details(self, **more: Any) -> Outcome:
        return replace(self, details={**self.details, **more})

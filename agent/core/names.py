"""The names the agent passes around, each defined once: instance, app, layer and program
names, addresses, labels, and the revision grammar (docs/architecture.md, "Names").

The configuration, the wire and the git adapter all check revisions with
``check_revision``: whatever the configuration accepts, the wire carries and git reads as
exactly one revision, never an option, a range, a reflog lookup or a path.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_RE = re.compile(NAME_PATTERN[1:-1])
#: Safe as a topic level, a path component and a supervisor program name.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
#: A host name or an IPv4/IPv6 address: what a presence message may carry.
Address = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:%_-]{1,253}$")]
#: Printable text on one line (who issued a command, an agent version).
Label = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,128}$")]

MAX_REVISION = 200
_REVISION_CHARS = re.compile(r"[A-Za-z0-9._/+-]+")
SHA_RE = re.compile(r"[0-9a-f]{40}")


def check_revision(value: str) -> str:
    """Return ``value`` when it is one branch, tag or sha; raise ValueError saying why not.

    Refused: a leading ``-`` (an option) or ``+`` (a forced refspec), ``..`` (a range),
    ``@{``, ``^``, ``~``, ``:``, whitespace and control characters (reflog, ancestry and
    path lookups), and what
    ``git check-ref-format`` refuses (a leading or trailing ``/`` or ``.``, ``//``, ``/.``,
    a ``.lock`` suffix).
    """
    if not 1 <= len(value) <= MAX_REVISION:
        raise ValueError(f"must be 1 to {MAX_REVISION} characters")
    if value.startswith("-"):
        raise ValueError("must not start with '-' (git would read it as an option)")
    if value.startswith("+"):
        raise ValueError("must not start with '+' (a forced refspec, not one revision)")
    if ".." in value:
        raise ValueError("must not contain '..' (a range, not one revision)")
    if not _REVISION_CHARS.fullmatch(value):
        raise ValueError(
            "may only contain A-Z a-z 0-9 . _ / + - "
            "(no whitespace, control characters, ':', '@{', '^' or '~')"
        )
    if (
        value.startswith(("/", "."))
        or value.endswith(("/", ".", ".lock"))
        or "/." in value
        or "//" in value
        or ".lock/" in value
    ):
        raise ValueError("is not a valid git ref name")
    return value


Revision = Annotated[str, AfterValidator(check_revision)]


def config_name(what: str, value: str) -> str:
    """``value`` when it is a valid name; otherwise a ValueError naming ``what``."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value[:140]!r}: use 1 to 128 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value

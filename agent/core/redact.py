"""One redactor for logs, events and messages: secret-looking keys and URL passwords.

``https://user:secret@host/x`` becomes ``https://user:***@host/x`` wherever it appears in
text, so a repository or supervisor URL is still recognisable and the password is gone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SECRET_KEY = re.compile(
    r"(^|_)(pass|passwd|password|secret|token|credentials?|private_key|signature|pem)($|_)", re.I
)
REDACTED = "[redacted]"
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)


def strip_url_password(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password masked."""
    return URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)


def redact_value(key: str, value: Any) -> Any:
    """``value`` as it may be shown under ``key``: masked when the key names a secret."""
    if SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str) and "://" in value:
        return strip_url_password(value)
    return value


def jsonable(value: Any) -> Any:
    """Plain JSON types (paths and the like become strings), with URL passwords masked and
    secret-looking keys redacted, as in the logs."""
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if SECRET_KEY.search(str(k)) else jsonable(v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, str):
        return strip_url_password(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return strip_url_password(str(value))

"""Bytes on the wire: canonical JSON (what signatures cover) and bounded JSON checks.

Split from ``agent.protocol`` so the models stay readable; both sides of the broker use the
one canonical encoding, and every payload is checked (size, UTF-8, depth, duplicate keys)
before any parser sees it, in one linear pass, so hostile input costs little.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ValidationError


def canonical_json(obj: Any) -> bytes:
    """Encode obj as the one byte string both signer and verifier compute.

    Sorted keys, no whitespace, UTF-8, datetimes as ISO-8601 UTC ("Z"); models are dumped.
    Raises ValueError for what has no canonical form (NaN, naive datetimes, lone surrogates).
    """
    text = json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_canonical_default,
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("string is not valid Unicode (lone surrogate)") from exc


def _canonical_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError("naive datetime has no canonical form")
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode(message: BaseModel) -> bytes:
    """Return the payload to publish for a message (canonical, so retained bytes are stable)."""
    return canonical_json(message.model_dump())


# A string token always matches once opened (an unterminated one runs to the end), so the
# scan never retries from later quotes: linear even for hostile input such as '"\\"\\"...'.
_TOKEN_RE = re.compile(r'"(?:[^"\\]++|\\.?)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


def nested_deeper_than(text: str, max_depth: int) -> bool:
    """Scan bracket depth outside strings; one linear pass, no recursion."""
    depth = 0
    for match in _TOKEN_RE.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey("an object has a duplicate key")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_json(payload: bytes, max_bytes: int, max_depth: int) -> str | None:
    """Return why payload is not an acceptable JSON object, or None if it is."""
    if not isinstance(payload, bytes | bytearray):
        return f"payload is {type(payload).__name__}, not bytes"
    if len(payload) > max_bytes:
        return f"payload is {len(payload)} bytes, over the limit of {max_bytes}"
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        return "payload is not valid UTF-8"
    if nested_deeper_than(text, max_depth):
        return f"payload is nested deeper than {max_depth} levels"
    try:
        value = json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except _DuplicateKey as exc:
        return f"payload is ambiguous: {exc}"
    except json.JSONDecodeError as exc:
        return f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:  # e.g. NaN, or an integer beyond Python's digit limit
        return f"payload is not JSON: {str(exc)[:120]}"
    if not isinstance(value, dict):
        return f"payload is a JSON {type(value).__name__}, not an object"
    try:
        canonical_json(value)
    except ValueError as exc:
        return f"payload has no canonical form: {exc}"
    return None


def summarise(exc: ValidationError, limit: int = 5) -> str:
    """Turn pydantic errors into "field: problem" lines that never echo the input."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    parts = []
    for error in errors[:limit]:
        field = ".".join(str(part) for part in error["loc"])[:64]
        field = "".join(ch if ch.isprintable() else "?" for ch in field)
        problem = _PROBLEMS.get(error["type"]) or error["msg"].removeprefix("Value error, ")
        # Some pydantic messages quote a character of the input: never a control one.
        problem = "".join(ch if ch.isprintable() else "?" for ch in problem)[:200]
        parts.append(f"{field}: {problem}" if field else problem)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


_PROBLEMS = {"extra_forbidden": "unknown field", "missing": "required field missing"}

"""What a site's own buildout configuration says, read from the repository at the revision
being deployed: today, the environment variables its ``[client1]`` sets.

deploy.cfg must replace ``environment-vars`` with one merged list (plone.recipe.zope2instance
refuses a variable given twice: "too many values for 'TZ'", and a plain ``=`` in deploy.cfg
drops what the base configuration set), so the agent needs the base value. This reads
buildout's syntax as far as that needs: sections, ``key = value`` with indented
continuation lines, ``+=`` and ``-=``, and ``extends`` chains of relative files. What it
cannot follow (a URL in ``extends``, a missing file) is skipped, never fatal.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable

Reader = Callable[[str], "str | None"]
SECTION = re.compile(r"^\[([^\]]+)\]\s*$")
OPTION = re.compile(r"^([^\s=+\-#;][^=]*?)\s*([+-]?=)\s*(.*)$")
MAX_FILES = 50


def parse(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Sections of one file: ``{section: {option: (operator, value)}}``, values joined
    with newlines as buildout does, comments dropped."""
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    current: dict[str, tuple[str, str]] | None = None
    key: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line[0] in " \t":
            if current is not None and key is not None:
                op, value = current[key]
                current[key] = (op, f"{value}\n{line.strip()}" if value else line.strip())
            continue
        if match := SECTION.match(line):
            current = sections.setdefault(match.group(1).strip(), {})
            key = None
            continue
        if current is not None and (match := OPTION.match(line)):
            key = match.group(1).strip()
            current[key] = (match.group(2), match.group(3).strip())
    return sections


def option_value(read: Reader, path: str, section: str, option: str) -> str | None:
    """The value of ``[section] option`` after the ``extends`` chain of ``path``."""
    return _value(read, path, section, option, seen=set())


def _value(read: Reader, path: str, section: str, option: str, seen: set[str]) -> str | None:
    if path in seen or len(seen) >= MAX_FILES:
        return None
    seen.add(path)
    text = read(path)
    if text is None:
        return None
    sections = parse(text)
    value: str | None = None
    extends = sections.get("buildout", {}).get("extends", ("=", ""))[1]
    for parent in extends.split():
        if "://" in parent or "$" in parent:
            continue
        inherited = _value(
            read,
            posixpath.normpath(posixpath.join(posixpath.dirname(path), parent)),
            section,
            option,
            seen,
        )
        if inherited is not None:
            value = inherited
    found = sections.get(section, {}).get(option)
    if found is None:
        return value
    op, own = found
    if op == "=":
        return own
    if op == "+=":
        return "\n".join(v for v in (value, own) if v)
    if op == "-=" and value is not None:
        removed = set(own.splitlines())
        return "\n".join(line for line in value.splitlines() if line not in removed)
    return value


def environment(read: Reader, path: str, section: str = "client1") -> dict[str, str]:
    """``environment-vars`` of ``section`` as {name: raw value}, in the base's order; for a
    name given twice the last one wins, as the merged list keeps one value per name."""
    value = option_value(read, path, section, "environment-vars") or ""
    env: dict[str, str] = {}
    for line in value.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name:
            env[name] = rest.strip()
    return env

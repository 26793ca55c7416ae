"""Entry point of ``bin/zeoserver``: runzeo with the zeo.conf the recipe wrote.

runzeo already does what a supervised server needs: SIGTERM closes the storage and exits
0, SIGUSR2 reopens the log.
"""

from __future__ import annotations

import sys
from typing import Any

import ZEO.runzeo

#: What ``bin/zeoserver`` accepts: nothing, or zdctl's ``fg`` (plone.recipe.zeoserver's
#: ``bin/zeoserver fg``, what the agent's generated program runs).
FOREGROUND_MODES = ((), ("fg",), ("console",))


def main(config: dict[str, Any], argv: list[str] | None = None) -> int:
    """Serve until a signal stops the server."""
    args = tuple(sys.argv[1:] if argv is None else argv)
    if args not in FOREGROUND_MODES:
        print(f"usage: bin/{config['name']} [fg]  (got {' '.join(args)})", file=sys.stderr)
        return 2
    ZEO.runzeo.main(["-C", config["conf"]])
    return 0

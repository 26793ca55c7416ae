"""Entry point of ``bin/zeoserver``: runzeo with the zeo.conf the recipe wrote.

runzeo already does what a supervised server needs: SIGTERM closes the storage and exits
0, SIGUSR2 reopens the log.
"""

from __future__ import annotations

from typing import Any

import ZEO.runzeo


def main(config: dict[str, Any]) -> int:
    """Serve until a signal stops the server."""
    ZEO.runzeo.main(["-C", config["conf"]])
    return 0

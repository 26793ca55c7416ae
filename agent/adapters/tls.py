"""One TLS client context for broker connections, the agent's and the operator's: built
once at start-up, so a bad certificate path is a configuration error, not a retry loop."""

from __future__ import annotations

import ssl

from agent.core.config import TlsConfig
from agent.core.errors import ConfigError


def client_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if tls.cert is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"broker.tls: cannot load CA, certificate or key: {exc}") from exc
    return context

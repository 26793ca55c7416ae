"""Adapters: each owns one external thing (git, buildout, supervisord, the broker, files)
and translates its errors (docs/architecture.md, "Layers")."""

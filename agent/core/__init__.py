"""The pure core: configuration models, stack settings, plans, deploy.cfg rendering,
outcomes and names. No I/O (docs/architecture.md, "Layers")."""

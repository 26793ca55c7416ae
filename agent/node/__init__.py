"""The on-instance agent: pipeline, rolling restart, fleet, intake, recovery, worker,
daemon (docs/architecture.md, "Layers")."""

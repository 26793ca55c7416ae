"""The operator's side: configuration and session, rollouts, display, commands. Never
imports agent.node (docs/architecture.md, "Layers")."""

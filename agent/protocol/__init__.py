"""The wire contract both sides share: topics, messages, signing (docs/architecture.md,
"Wire protocol")."""

"""Small shared utilities: distributed helpers, checkpoints, seeding and run provenance."""

"""Small shared utilities: distributed helpers, checkpoints, seeding, precision, schedules and pictures."""

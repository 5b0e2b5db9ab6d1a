"""Seeded synthetic long-context tasks (no data is downloaded)."""

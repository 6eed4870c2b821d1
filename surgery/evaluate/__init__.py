"""surgery.evaluate."""

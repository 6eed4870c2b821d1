"""surgery.merge."""

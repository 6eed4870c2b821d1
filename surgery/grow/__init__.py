"""surgery.grow."""

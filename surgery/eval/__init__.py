"""surgery.eval."""

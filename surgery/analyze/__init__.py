"""surgery.analyze."""

"""surgery.edit."""

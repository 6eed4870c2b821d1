"""surgery.adapters."""

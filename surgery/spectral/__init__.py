"""surgery.spectral."""

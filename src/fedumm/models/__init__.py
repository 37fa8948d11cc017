"""fedumm.models."""

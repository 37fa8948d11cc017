"""fedumm.engines."""

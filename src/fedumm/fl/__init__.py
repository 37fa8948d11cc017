"""fedumm.fl."""

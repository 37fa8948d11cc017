"""fedumm.eval."""

"""fedumm.data."""

"""fedumm.client."""

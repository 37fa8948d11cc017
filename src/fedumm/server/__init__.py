"""fedumm.server."""

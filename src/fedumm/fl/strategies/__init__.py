"""fedumm.fl.strategies."""

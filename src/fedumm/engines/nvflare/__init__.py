"""fedumm.engines.nvflare."""

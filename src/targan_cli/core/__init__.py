"""Networks, losses, intensity mapping and slicing: torch and numpy only, no files, no printing."""

"""File formats: volumes with geometry, weights folders, atomic writes."""

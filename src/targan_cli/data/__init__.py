"""Datasets: the DATA layout, the training slice cache, CHAOS import and the phantom generator."""

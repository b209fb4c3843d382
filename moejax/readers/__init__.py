"""Readers of finished runs (read-only, beside a live one): open a saved step, evaluate it,
sample from it, plot its routing."""

"""Calibration policy on top of the torch executor: observers, baseline calibrators, feeds, the method registry."""

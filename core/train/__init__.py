"""Calibration: the losses, the full-batch training loop, its checkpoint and its log."""

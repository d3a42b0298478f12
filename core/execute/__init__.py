"""Execution: glacier sets, shape classes and batches, devices and processes, compiled shapes."""

"""Calibration, inference and evaluation of the GlaUnTI models, in layers (docs/architecture.md).

Imports point down only (checked by import-linter, ``[tool.importlinter]`` in pyproject.toml):

- ``core.apps``: applications (command-line plumbing, demo, cross-validation, facies ablation,
  own glacier, notebook set-up, region, glacier evolution);
- ``core.workflows``: calibrate, infer and evaluate, fine-tune: what the scripts run;
- ``core.train`` (losses, loop, checkpoint, log), ``core.infer`` (daily SMB runner, NetCDF
  writer), ``core.evaluate`` (metrics, summaries): independent of each other;
- ``core.execute`` (glacier sets, shape classes and batches, devices and processes, compiled
  shapes) and ``core.models`` (the variants by name, their schedules and parameter files);
- ``core.io`` (atomic writes, output checks);
- then ``glaunti`` (the models) and ``dataloader`` (the data), then ``constants``.
"""

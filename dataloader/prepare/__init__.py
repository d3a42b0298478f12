"""Prepare one glacier of the published layout from public sources (outlines, DEM, reanalysis
climate, WGMS records, ICEmapper outline and facies-classifier rasters); see docs/own_glacier.md.

The steps live in submodules that return arrays (``grid``, ``outlines``, ``terrain``, ``facies``,
``climate``, ``observations``); :func:`dataloader.prepare.glacier.prepare_glacier` combines them
and writes the files.
"""

"""Applications built on the workflows: demo, cross-validation, region, ..."""

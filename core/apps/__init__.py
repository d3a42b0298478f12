"""Applications built on the workflows: command-line plumbing, demo, cross-validation, facies
ablation, own glacier, notebook set-up, region, glacier evolution."""

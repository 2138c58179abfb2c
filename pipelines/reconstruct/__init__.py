"""Reconstructing mesh sequences from sparse or partial point-cloud sequences, after Motion2VecSets (CVPR 2024)."""

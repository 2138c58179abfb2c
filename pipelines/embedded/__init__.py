"""sparsediff's own small video diffusion model: procedural shape clips, a pixel-space Wan pipeline, its detector."""

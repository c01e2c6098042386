"""Stage 1 of METHOD.md: images + class names -> pseudo-labels (index, clip_dense, the SAM
stages, merge, export)."""

"""Stage 2 of METHOD.md: the alignment module trained on frozen DINOv2 patch features."""

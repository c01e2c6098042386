"""The pipeline's stages, grouped by what they serve: ``annotate`` (stage 1: index, dense
CLIP + presence, SAM prompt/auto, merge, export), ``train`` (stage 2) and ``evaluate``.
Each stage is a pure core plus a shard worker, declared once for :mod:`fmbseg.engine`."""

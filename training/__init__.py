"""ovseg.training: the OVSegmentor model, its losses, data loading over the on-disk contract,
distributed helpers, the training loop, checkpoints and presets.

Reads only the on-disk contract written by curation (docs/schemas.md), never curation code.
"""

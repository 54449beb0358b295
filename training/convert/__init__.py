"""Checkpoint converters: the published OVSegmentor and GroupViT weights (and transformers'
GroupViT) as ovseg checkpoints that give the official models' outputs. Reading a source file
never runs code from it (`unpickle`)."""

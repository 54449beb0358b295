"""Projectors into the shared image-text space (the paper: 2 layers, 4096 hidden, 256 out)."""

import torch.nn as nn


class Projector(nn.Sequential):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))

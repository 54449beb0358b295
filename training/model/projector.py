"""Projectors into the shared image-text space (the paper: 2 layers, 4096 hidden, 256 out).

As in GroupViT's and OVSegmentor's public code the hidden layer is batch-normalised: two towers
trained from scratch start with nearly identical outputs for every input, and the contrastive
loss has a stationary point where all embeddings coincide (its gradient is then zero); without
batch normalisation both towers fall into it within a few steps and the loss stays at log(B).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C_in) -> (..., C_out); batch statistics over every leading dimension."""
        shape = x.shape
        h = self.fc1(x.reshape(-1, shape[-1]))
        if self.training and h.shape[0] == 1:
            # one row has no batch statistics: normalise it with the running ones
            h = F.batch_norm(h, self.norm.running_mean, self.norm.running_var, self.norm.weight, self.norm.bias,
                             training=False, eps=self.norm.eps)
        else:
            h = self.norm(h)
        return self.fc2(self.act(h)).reshape(*shape[:-1], -1)

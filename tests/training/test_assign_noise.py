"""`model.assign_noise`: the scale of the Gumbel noise in the learned grouping's training assignment."""

import torch

from ovseg.training.model.config import ModelConfig
from ovseg.training.model.grouping import AssignAttention
from ovseg.training.model.image_encoder import GroupingViT


def _attn_in_training(scale: float, queries: torch.Tensor, patches: torch.Tensor):
    """A training forward of an assigner whose groups are the plain mean of their patches, and
    each patch's best group without noise."""
    torch.manual_seed(0)
    assign = AssignAttention(8, hard=True, noise_scale=scale)
    with torch.no_grad():  # identity value and output projections: a group's output is its patches' mean
        for proj in (assign.v_proj, assign.proj):
            proj.weight.copy_(torch.eye(8))
            proj.bias.zero_()
    assign.train()
    out = assign(queries, patches)
    best = out.soft.argmax(1)  # (B, N): each patch's best group, no noise
    return out, best


def test_without_noise_training_takes_each_patchs_best_group_with_the_soft_gradient():
    torch.manual_seed(1)
    queries, patches = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 32, 8)
    out, best = _attn_in_training(0.0, queries, patches)
    one_hot = torch.nn.functional.one_hot(best, 4).transpose(1, 2).float()  # (B, K, N)
    expected = (one_hot / (one_hot.sum(-1, keepdim=True) + 1.0)) @ patches
    assert torch.allclose(out.merged, expected, atol=1e-5)
    # straight-through: the queries reach the output only through the assignment, by its soft gradient
    (out.merged * torch.randn_like(out.merged)).sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0


def test_with_the_noise_the_training_sample_departs_from_the_best_group():
    torch.manual_seed(1)
    # small logits (the untrained case): GroupViT's noise moves many patches off their best group
    queries, patches = 0.1 * torch.randn(2, 4, 8), torch.randn(2, 256, 8)
    noisy, best = _attn_in_training(1.0, queries, patches)
    quiet, _ = _attn_in_training(0.0, queries, patches)
    assert not torch.allclose(noisy.merged, quiet.merged, atol=1e-3)


def test_the_setting_reaches_the_encoders_assigner_and_is_one_by_default():
    small = dict(image_size=16, patch_size=4, width=16, heads=2, depth_before=1, depth_after=1,
                 num_group_tokens=4, num_groups=2)
    assert ModelConfig().assign_noise == 1.0
    assert GroupingViT(ModelConfig(**small)).grouping.assign.noise_scale == 1.0
    assert GroupingViT(ModelConfig(**small, assign_noise=0.0)).grouping.assign.noise_scale == 0.0

"""`model.assign_center`: the learned assignment's logits lose each group's mean over the patches."""

import torch

from ovseg.training.model.config import ModelConfig
from ovseg.training.model.grouping import AssignAttention
from ovseg.training.model.image_encoder import GroupingViT


def _assigner(center: bool) -> AssignAttention:
    torch.manual_seed(0)
    assign = AssignAttention(8, hard=True, center=center).eval()
    with torch.no_grad():  # identity projections; a key bias that only group 0's query reads
        for proj in (assign.q_proj, assign.k_proj):
            proj.weight.copy_(torch.eye(8))
            proj.bias.zero_()
        assign.k_proj.bias[0] = 20.0
    return assign


def test_a_constant_per_group_takes_every_patch_unless_the_logits_are_centred():
    queries = torch.zeros(1, 4, 8)
    queries[0, 0, 0] = 1.0  # group 0's query reads the key bias: a constant over every patch
    queries[0, 1:, 1:4] = 3 * torch.eye(3)  # the others read what differs between patches
    patches = torch.randn(1, 16, 8)
    plain, centred = _assigner(False), _assigner(True)
    assert plain(queries, patches).soft.argmax(1).unique().tolist() == [0]  # one group holds the image
    logits = centred.logits(queries, patches)  # (1, K, N)
    assert torch.allclose(logits.mean(-1), torch.zeros(1, 4), atol=1e-5)
    # the same as the plain logits less each group's mean: what differs between patches is kept
    raw = plain.logits(queries, patches)
    assert torch.allclose(logits, raw - raw.mean(-1, keepdim=True), atol=1e-5)
    assert len(centred(queries, patches).soft.argmax(1).unique()) > 1


def test_the_setting_reaches_the_encoders_assigner_and_is_off_by_default():
    small = dict(image_size=16, patch_size=4, width=16, heads=2, depth_before=1, depth_after=1,
                 num_group_tokens=4, num_groups=2)
    assert ModelConfig().assign_center is False
    assert GroupingViT(ModelConfig(**small)).grouping.assign.center is False
    assert GroupingViT(ModelConfig(**small, assign_center=True)).grouping.assign.center is True

"""The three losses on small tensors: contrastive against a hand computation and across two
real gloo processes, dice values known by hand, the mask loss's matching and group selection."""

import importlib.util
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ovseg.training.losses import MaskConsistencyLoss, contrastive_loss, dice_loss, grounding_loss, pooled_similarity
from ovseg.training.losses.mask_consistency import pairwise_dice_cost

torch.set_num_threads(1)
WORKER = Path(__file__).with_name("gloo_contrastive_worker.py")


# -- contrastive --------------------------------------------------------------------------------

def hand_infonce(a: list[list[float]], b: list[list[float]], scale: float) -> float:
    """Symmetric InfoNCE with plain Python arithmetic."""
    n = len(a)

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v))

    def direction(p, q):
        total = 0.0
        for i in range(n):
            logits = [scale * dot(p[i], q[j]) for j in range(n)]
            total += -logits[i] + math.log(sum(math.exp(z) for z in logits))
        return total / n

    return 0.5 * (direction(a, b) + direction(b, a))


def test_contrastive_loss_equals_a_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    got = contrastive_loss(a, b, torch.tensor(3.0))
    assert got.item() == pytest.approx(hand_infonce(a.tolist(), b.tolist(), 3.0), rel=1e-6)


def test_contrastive_loss_is_low_when_pairs_match_and_high_when_shuffled():
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    matched = contrastive_loss(a, a, torch.tensor(50.0))
    shuffled = contrastive_loss(a, a.roll(1, dims=0), torch.tensor(50.0))
    assert matched < 0.1 < shuffled


def test_invalid_rows_drop_out_of_both_sides_of_the_contrastive_loss():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    valid = torch.tensor([True, False, True, True, False])
    got = contrastive_loss(a, b, torch.tensor(4.0), valid=valid)
    kept = contrastive_loss(a[valid], b[valid], torch.tensor(4.0))
    torch.testing.assert_close(got, kept)


def test_contrastive_loss_with_no_valid_row_is_zero_and_keeps_the_graph():
    a = torch.randn(3, 4, requires_grad=True)
    loss = contrastive_loss(a, a.detach(), torch.tensor(1.0), valid=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and a.grad is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_loss_and_gradients_on_the_concatenated_batch(tmp_path):
    port, out = _free_port(), tmp_path / "rank0.pt"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()[-2000:]
    gathered = torch.load(out, weights_only=True)

    spec = importlib.util.spec_from_file_location("gloo_contrastive_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    x_img, x_txt, w_img, w_txt, valid = worker.problem()
    for name, mask in (("all", None), ("valid", valid)):
        loss, grads = worker.loss_and_grads(x_img, x_txt, w_img, w_txt, mask)
        dist_loss, dist_grads = gathered[name]
        torch.testing.assert_close(dist_loss, loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(dist_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- dice and mask consistency ------------------------------------------------------------------

def test_dice_loss_has_known_values():
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # (2*inter + 1) / (|p| + |t| + 1): 3/4, 5/5, 1/3, 3/4
    torch.testing.assert_close(dice_loss(pred, target), torch.tensor([0.25, 0.0, 2 / 3, 0.25]))
    cost = pairwise_dice_cost(pred, target)
    torch.testing.assert_close(cost.diagonal(), dice_loss(pred, target))
    torch.testing.assert_close(cost[0, 1], dice_loss(pred[0], target[1]))


def _mask_problem(seed=0, b=3, k=5, n=12):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, k, n, generator=g).softmax(dim=1)
    teacher = torch.randn(b, k, n, generator=g).mul(3).softmax(dim=1)
    relevance = torch.randn(b, k, generator=g)
    return student, teacher, relevance, torch.tensor([True, True, True])


def test_permuting_one_images_groups_leaves_the_mask_loss_unchanged():
    loss_fn = MaskConsistencyLoss(keep_groups=3)
    student, teacher, relevance, has = _mask_problem()
    base = loss_fn(student, teacher, relevance, has)
    perm = torch.tensor([3, 0, 4, 1, 2])
    s2, r2 = student.clone(), relevance.clone()
    s2[1], r2[1] = student[1, perm], relevance[1, perm]  # the image's own groups, reordered
    torch.testing.assert_close(loss_fn(s2, teacher, r2, has), base)
    t2 = teacher.clone()
    t2[2] = teacher[2, perm]  # the partner's groups, reordered
    torch.testing.assert_close(loss_fn(student, t2, relevance, has), base)


def test_mask_loss_matches_groups_so_identical_masks_in_another_order_cost_nothing():
    teacher = torch.eye(4).repeat_interleave(3, dim=1)[None]  # (1, K=4, N=12), one-hot groups
    student = teacher[:, [2, 0, 3, 1]]
    loss = MaskConsistencyLoss(keep_groups=4)(student, teacher, torch.zeros(1, 4), torch.tensor([True]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_groups_least_related_to_the_shared_entity_receive_no_gradient():
    student, teacher, relevance, has = _mask_problem()
    student.requires_grad_(True)
    MaskConsistencyLoss(keep_groups=2)(student, teacher, relevance, has).backward()
    for b in range(3):
        kept = set(relevance[b].topk(2).indices.tolist())
        for k in range(5):
            moved = student.grad[b, k].abs().sum().item()
            assert (moved > 0) == (k in kept), (b, k, moved)


def test_samples_without_a_partner_do_not_count():
    student, teacher, relevance, _ = _mask_problem()
    loss_fn = MaskConsistencyLoss(keep_groups=2)
    only_first = loss_fn(student, teacher, relevance, torch.tensor([True, False, False]))
    torch.testing.assert_close(only_first, loss_fn(student[:1], teacher[:1], relevance[:1], torch.tensor([True])))
    none = loss_fn(student.requires_grad_(True), teacher, relevance, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0


def test_entity_matching_targets_the_partners_group_most_related_to_the_entity():
    # one-hot groups; the image's group 0 is the entity's (highest relevance) and its mask on the
    # partner overlaps the partner's group 1 most, but the partner's entity group is group 3
    teacher = torch.eye(4).repeat_interleave(3, dim=1)[None]  # (1, 4, 12)
    student = teacher[:, [1, 0, 2, 3]].clone()
    relevance = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    partner_relevance = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    has = torch.tensor([True])
    by_overlap = MaskConsistencyLoss(keep_groups=1, matching="dice")(student, teacher, relevance, has, partner_relevance)
    by_entity = MaskConsistencyLoss(keep_groups=1, matching="entity")(student, teacher, relevance, has, partner_relevance)
    assert by_overlap.item() == pytest.approx(0.0, abs=1e-6)  # matched to group 1, which it already is
    assert by_entity.item() == pytest.approx(dice_loss(student[0, 0], teacher[0, 3]).item())
    with pytest.raises(ValueError, match="partner's relevance"):
        MaskConsistencyLoss(keep_groups=1, matching="entity")(student, teacher, relevance, has)
    with pytest.raises(ValueError, match="unknown mask matching"):
        MaskConsistencyLoss(matching="nearest")


def test_entity_matching_pairs_the_kept_groups_with_the_partners_kept_groups_by_overlap():
    student, teacher, relevance, has = _mask_problem()
    partner_relevance = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    loss = MaskConsistencyLoss(keep_groups=2, threshold=0.3, matching="entity")(student, teacher, relevance, has,
                                                                                partner_relevance)
    expected = []
    for b in range(3):
        mine = student[b, relevance[b].topk(2).indices]
        theirs = (teacher[b, partner_relevance[b].topk(2).indices] > 0.3).float()
        # the cheaper of the two one-to-one pairings
        straight = dice_loss(mine, theirs).mean()
        crossed = dice_loss(mine, theirs.flip(0)).mean()
        expected.append(torch.minimum(straight, crossed))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


# -- grounding ----------------------------------------------------------------------------------

def test_pooled_similarity_is_the_best_groups_cosine_when_the_temperature_is_small():
    groups = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2 groups, D 2)
    entities = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    area = torch.tensor([[0.5, 0.5]])
    pooled = pooled_similarity(groups, area, entities, tau=0.01)
    assert torch.allclose(pooled, torch.tensor([[1.0, 1.0, 0.0]]), atol=0.01)


def test_a_group_without_patches_cannot_answer_for_an_entity():
    groups = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    entities = torch.tensor([[0.0, 1.0]])  # matches only the second group
    with_area = pooled_similarity(groups, torch.tensor([[0.5, 0.5]]), entities, tau=0.05)
    empty = pooled_similarity(groups, torch.tensor([[1.0, 0.0]]), entities, tau=0.05)
    assert with_area.item() > 0.9 and empty.item() < 0.1


def test_grounding_loss_equals_binary_cross_entropy_by_hand_and_falls_as_the_right_group_moves_closer():
    entities = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[True, False]])
    area = torch.tensor([[1.0]])
    scale, bias, tau = torch.tensor(10.0), torch.tensor(-3.0), 0.1

    def loss_at(angle):
        g = torch.tensor([[[math.cos(angle), math.sin(angle)]]])
        return grounding_loss(g, area, entities, targets, scale, bias, tau)

    # one group of all the area: the pooled similarity is its cosine
    g = torch.tensor([[[0.6, 0.8]]])
    z = torch.tensor([10 * 0.6 - 3, 10 * 0.8 - 3])
    by_hand = -(math.log(torch.sigmoid(z[0]).item()) + math.log(1 - torch.sigmoid(z[1]).item())) / 2
    assert grounding_loss(g, area, entities, targets, scale, bias, tau).item() == pytest.approx(by_hand, rel=1e-5)
    assert loss_at(0.1) < loss_at(0.8) < loss_at(1.5)


# -- mask consistency, the official form ----------------------------------------------------------

def test_official_targets_are_one_where_the_sigmoid_reaches_the_ratio_of_its_mask_maximum():
    from ovseg.training.losses.mask_consistency import relative_targets

    prob = torch.tensor([[0.9, 0.6, 0.5, 0.1]])  # 0.6 x 0.9 = 0.54: 0.9 and 0.6 reach it
    logits = torch.log(prob / (1 - prob))
    assert relative_targets(logits, 0.6).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # at ratio 1 only the maximum itself: equality gives 1
    assert relative_targets(torch.tensor([[2.0, 2.0, 1.0]]), 1.0).tolist() == [[1.0, 1.0, 0.0]]
    # the threshold is relative to each mask: a mask of low logits still has its own foreground
    assert relative_targets(torch.tensor([[-6.0, -3.0, -9.0]]), 0.6).tolist() == [[0.0, 1.0, 0.0]]


def test_official_student_masks_are_min_max_normalised_per_mask():
    from ovseg.training.losses.mask_consistency import min_max_normalise

    x = torch.tensor([[[2.0, 4.0, 6.0], [-1.0, -3.0, 1.0]]])
    torch.testing.assert_close(min_max_normalise(x), torch.tensor([[[0.0, 0.5, 1.0], [0.5, 0.0, 1.0]]]))
    assert torch.isfinite(min_max_normalise(torch.ones(1, 1, 3))).all()  # a flat mask stays finite


def test_official_dice_is_one_per_sample_over_its_masks_summed_and_divided_by_k():
    from ovseg.training.losses import sample_dice_loss

    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])  # (P=2, K=2, N=2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]])
    # sample 0: a perfect match (0); sample 1: its 4 flattened values share nothing: 1 - 1 / (2 + 2 + 1) = 0.8;
    # summed (0.8) and divided by K = 2. A per-mask mean would give (0 + 0 + 2/3 + 2/3) / 4 = 1/3
    torch.testing.assert_close(sample_dice_loss(pred, target, 2), torch.tensor(0.4))


def test_official_matching_pairs_masks_by_l2_distance_of_the_normalised_masks():
    from ovseg.training.losses.mask_consistency import l2_matching

    student = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    perm = torch.tensor([2, 0, 1])
    # the teacher holds the student's masks in another order, one of them 100 times larger: an
    # unnormalised distance would pair the large one with nothing like it
    teacher = student[:, perm] * torch.tensor([1.0, 100.0, 1.0])[None, :, None]
    match = l2_matching(student, teacher)  # student i -> teacher match[i]
    assert match.tolist() == [torch.argsort(perm).tolist()]
    assert torch.equal(teacher[0, match[0]] / teacher[0, match[0]].amax(-1, keepdim=True), student[0])


def test_official_mask_loss_is_zero_only_under_the_right_matching_on_a_hand_built_pair():
    from ovseg.training.losses import OfficialMaskConsistencyLoss

    # student logits: mask 0 -> [0, 1] after min-max, mask 1 -> [1, 0]; teacher: sigmoid targets
    # [1, 0] and [0, 1]. By L2 of the normalised logits, student 0 pairs with teacher 1 and
    # student 1 with teacher 0: every matched target equals its student, so the dice is 0; the
    # identity pairing would give 1 - 1 / 5 = 0.8 for the sample, / K = 0.4
    student = torch.tensor([[[[0.0, 2.0]], [[3.0, 1.0]]]])  # (B=1, K=2, h=1, w=2)
    teacher = torch.tensor([[[[5.0, -5.0]], [[-5.0, 5.0]]]])
    loss = OfficialMaskConsistencyLoss(group_ratio=0.0, threshold=0.6)
    value = loss(student, teacher, torch.zeros(1, 2), torch.tensor([True]))
    torch.testing.assert_close(value, torch.tensor(0.0))
    swapped = loss(student, teacher.flip(1), torch.zeros(1, 2), torch.tensor([True]))
    torch.testing.assert_close(swapped, torch.tensor(0.0))  # the teacher's order does not matter


def test_official_mask_loss_detaches_the_least_related_groups_which_still_take_part_in_matching():
    from ovseg.training.losses import OfficialMaskConsistencyLoss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3, generator=g)
    relevance = torch.tensor([[0.9, -1.0, 0.5, -2.0], [-0.3, 0.2, 0.1, 0.4]])
    loss = OfficialMaskConsistencyLoss(group_ratio=0.5, threshold=0.6)
    loss(student, teacher, relevance, torch.tensor([True, True])).backward()
    moved = student.grad.flatten(2).abs().sum(-1) > 0  # (B, K)
    # bottom int(4 x 0.5) = 2 by relevance: groups 1 and 3 of sample 0, 0 and 2 of sample 1
    assert moved.tolist() == [[True, False, True, False], [False, True, False, True]]
    # detached, not dropped: the pairs keep all K masks with their values
    kept, targets = loss.pairs(student, teacher, relevance)
    assert kept.shape == targets.shape == (2, 4, 9)
    torch.testing.assert_close(kept, student.detach().flatten(2))


def test_official_mask_loss_upsamples_with_aligned_corners_and_skips_rows_without_a_partner():
    from ovseg.training.losses import OfficialMaskConsistencyLoss

    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    loss = OfficialMaskConsistencyLoss(group_ratio=0.5)
    kept, _ = loss.pairs(student, teacher, torch.zeros(3, 2), size=(3, 3))
    up = kept.view(3, 2, 3, 3)
    torch.testing.assert_close(up[..., ::2, ::2], student)  # align_corners: the corners are the logits
    torch.testing.assert_close(up[..., 1, 1], student.mean(dim=(-1, -2)))  # the centre: their mean
    has = torch.tensor([True, False, True])
    rows = torch.tensor([0, 2])
    torch.testing.assert_close(loss(student, teacher, torch.zeros(3, 2), has),
                               loss(student[rows], teacher[rows], torch.zeros(2, 2), has[rows]))
    none = loss(student.requires_grad_(), teacher, torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad

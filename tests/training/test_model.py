"""The OVSegmentor model on the tiny `test` preset: gradients under each loss, the grouping
block's assignment, any input size, padding, the momentum encoder, DINO init, text encoders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ovseg.training.model import ModelConfig, build_model, parameter_counts, parameter_table  # noqa: E402
from ovseg.training.model.grouping import gumbel_softmax_over_groups  # noqa: E402
from ovseg.training.model.image_encoder import load_dino  # noqa: E402
from ovseg.training.presets import get_preset  # noqa: E402
from ovseg.training.tokenizer import train_wordpiece  # noqa: E402

torch.set_num_threads(1)

CAPTIONS = ["a photo of a red circle on grass", "a blue square next to a star", "a dog and a person",
            "two people walk a dog on the beach", "a star above a square"] * 2


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(CAPTIONS, vocab_size=200, min_frequency=1)


def tiny_config(**changes) -> ModelConfig:
    cfg = ModelConfig(**get_preset("test")["model"])
    return dataclasses.replace(cfg, **changes)


def make_batch(tokenizer, b: int = 4, size: int = 32, length: int = 16) -> dict:
    def enc(texts):
        e = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    captions = ["a red circle on grass", "a blue square", "a dog and a person", "a star"][:b]
    ids, mask = enc(captions)
    q_ids, q_mask = enc([c.replace("circle", "[MASK]").replace("dog", "[MASK]") for c in captions])
    a_ids, a_mask = enc(["a photo of a circle", "a photo of a square", "a photo of a dog and a person",
                         "a photo of a star"][:b])
    s_ids, s_mask = enc(["a photo of a circle"] * b)
    # grounding: up to two masked entities per caption, one prompt each, key -1 for an empty slot
    slots = [["circle", ""], ["square", ""], ["dog", "person"], ["star", ""]][:b]
    e_ids, e_mask = enc([f"a photo of a {e}." if e else "" for row in slots for e in row])
    keys = {"circle": 1, "square": 2, "dog": 3, "person": 4, "star": 5}
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "input_ids": ids, "attention_mask": mask,
        "question_ids": q_ids, "question_mask": q_mask,
        "answer_ids": a_ids, "answer_mask": a_mask,
        "has_entity": torch.tensor([True, True, False, True][:b]),
        "partner_image": torch.randn(b, 3, size, size, generator=g),
        "shared_ids": s_ids, "shared_mask": s_mask,
        "has_partner": torch.tensor([True, False, True, True][:b]),
        "entity_prompt_ids": e_ids.view(b, 2, -1), "entity_prompt_mask": e_mask.view(b, 2, -1),
        "entity_keys": torch.tensor([[keys.get(e, -1) for e in row] for row in slots]),
        "sample_id": torch.arange(b),
    }


# -- gradients --------------------------------------------------------------------------------

# parameters a loss cannot reach by design (grounding_scale and grounding_bias belong to the
# grounding loss alone)
UNREACHED = {
    # the contrastive loss reads only the text encoder's [CLS] output: BERT's last-layer
    # attention/MLP on the other tokens still shape CLS, so every parameter is reached
    "contrastive": ("grounding_",),
    # the entity loss reads group tokens, not the image embedding; the text projector is
    # reached through the answer embedding
    "entity": ("image_projector.", "grounding_"),
    # the mask loss reads only the group queries and patch tokens (before the blocks after
    # grouping) and text only without gradient
    # grounding reads the group embeddings and the soft assignment (through each group's area),
    # never the mean image embedding's path alone; everything is reached
    "grounding": ("logit_scale",),
    "mask": ("text_encoder.", "text_projector.", "image_encoder.blocks_after.", "image_encoder.norm.",
             "image_encoder.grouping.mlp_channels.", "image_encoder.grouping.norm_new_x.",
             "image_encoder.grouping.assign.v_proj.", "image_encoder.grouping.assign.proj.",
             "image_projector.", "logit_scale", "grounding_"),
}


@pytest.mark.parametrize("loss", ["contrastive", "entity", "grounding", "mask"])
def test_every_trainable_parameter_gets_a_finite_gradient_under_each_loss(tokenizer, loss):
    torch.manual_seed(0)
    model = build_model(tiny_config(losses=[loss]), tokenizer=tokenizer)
    model.train()
    out = model(make_batch(tokenizer))
    assert set(out) == {loss, "loss"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(UNREACHED[loss]):
            continue
        assert p.grad is not None, f"{name} got no gradient from the {loss} loss"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        # the word embedding rows of tokens not in the batch are exactly zero; all else moves
        if "word_embeddings" not in name:
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient under the {loss} loss"


def test_all_losses_together_give_weighted_sum(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(losses=["contrastive", "entity", "mask"],
                      loss_weights={"contrastive": 1.0, "entity": 0.5, "mask": 2.0})
    model = build_model(cfg, tokenizer=tokenizer).eval()
    out = model(make_batch(tokenizer))
    expected = out["contrastive"] + 0.5 * out["entity"] + 2.0 * out["mask"]
    torch.testing.assert_close(out["loss"], expected)


def test_unknown_loss_name_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="unknown losses"):
        build_model(tiny_config(losses=["contrastive", "clip"]), tokenizer=tokenizer)


# -- grouping -----------------------------------------------------------------------------------

def test_gumbel_straight_through_is_one_hot_forward_and_passes_gradient_backward():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)  # (B, K, N)
    hard = gumbel_softmax_over_groups(logits, tau=1.0, hard=True)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.sum(dim=1), torch.ones(2, 7))
    weights = torch.randn(2, 5, 7)
    (hard * weights).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_assignment_sums_to_one_over_groups_in_eval(tokenizer):
    model = build_model(tiny_config(), tokenizer=tokenizer).eval()
    out = model.encode_image(torch.randn(3, 3, 32, 32))
    assert out.assignment.shape == (3, 4, 4, 4)
    torch.testing.assert_close(out.assignment.sum(dim=1), torch.ones(3, 4, 4))
    assert (out.assignment > 0).all() and (out.assignment < 1).all()  # soft, not one-hot


def test_training_merges_patches_by_a_gumbel_hard_assignment_and_eval_by_the_best_group(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(), tokenizer=tokenizer)
    assign = model.image_encoder.grouping.assign
    queries, x = torch.randn(2, 4, 32), torch.randn(2, 16, 32)  # (B, K, C), (B, N, C)
    raw = assign.logits(queries, x)  # (B, K, N)

    def merged(attn):  # each group takes the mean of the values of the patches assigned to it
        return assign.proj(attn / (attn.sum(-1, keepdim=True) + 1.0) @ assign.v_proj(x))

    assign.train()
    torch.manual_seed(1)
    out_train, soft = assign(queries, x)[:2]
    torch.manual_seed(1)  # the same Gumbel noise
    one_hot = gumbel_softmax_over_groups(raw, assign.tau, hard=True)
    assert set(one_hot.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out_train, merged(one_hot))
    assign.eval()
    out_eval, soft_eval = assign(queries, x)[:2]
    # GroupViT and OVSegmentor pool with the one-hot of the best group at eval too
    best = torch.zeros_like(raw).scatter_(1, raw.argmax(dim=1, keepdim=True), 1.0)
    torch.testing.assert_close(out_eval, merged(best))
    assert not torch.allclose(out_eval, merged(raw.softmax(dim=1)), atol=1e-3)
    torch.testing.assert_close(soft, soft_eval)  # the returned assignment is always the soft one


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (64, 16), (8, 8)])
def test_any_input_size_divisible_by_the_patch_gives_assignment_maps_of_that_grid(tokenizer, size):
    model = build_model(tiny_config(), tokenizer=tokenizer).eval()
    h, w = size
    out = model.encode_image(torch.randn(2, 3, h, w))
    assert out.assignment.shape == (2, 4, h // 8, w // 8)
    assert out.embedding.shape == (2, 32) and out.group_embeddings.shape == (2, 4, 32)
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.group_embeddings.norm(dim=-1), torch.ones(2, 4))


def test_input_size_not_divisible_by_the_patch_is_a_clear_error(tokenizer):
    model = build_model(tiny_config(), tokenizer=tokenizer).eval()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode_image(torch.randn(1, 3, 30, 32))


# -- text and entity decoder --------------------------------------------------------------------

def test_padding_a_question_changes_nothing(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(losses=["entity"]), tokenizer=tokenizer).eval()
    groups = torch.randn(2, 4, 32)
    short = tokenizer(["a red [MASK]", "a [MASK] and a person"], padding=True, return_tensors="pt")
    long = tokenizer(["a red [MASK]", "a [MASK] and a person"], padding="max_length", max_length=20,
                     return_tensors="pt")
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        a = model.entity_decoder(model.text_features(short["input_ids"], short["attention_mask"]),
                                     short["attention_mask"], groups)
        b = model.entity_decoder(model.text_features(long["input_ids"], long["attention_mask"]),
                                     long["attention_mask"], groups)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_decoder_reads_the_groups(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(losses=["entity"]), tokenizer=tokenizer).eval()
    q = tokenizer(["a red [MASK]"], return_tensors="pt")
    feats = model.text_features(q["input_ids"], q["attention_mask"])
    with torch.no_grad():
        a = model.entity_decoder(feats, q["attention_mask"], torch.randn(1, 4, 32))
        b = model.entity_decoder(feats, q["attention_mask"], torch.randn(1, 4, 32))
    assert not torch.allclose(a, b)


def test_encode_text_is_normalised_and_ignores_batch_padding(tokenizer):
    model = build_model(tiny_config(), tokenizer=tokenizer).eval()
    with torch.no_grad():
        alone = model.encode_text(["a dog"])
        batched = model.encode_text(["a dog", "two people walk a dog on the beach"])
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100(tokenizer):
    model = build_model(tiny_config(), tokenizer=tokenizer)
    torch.testing.assert_close(model.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == 100.0


# -- momentum encoder ---------------------------------------------------------------------------

def test_momentum_copy_takes_no_gradient_and_follows_by_ema(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(losses=["contrastive", "mask"], momentum=0.9), tokenizer=tokenizer)
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    model(make_batch(tokenizer))["loss"].backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    with torch.no_grad():  # move the student, as an optimiser step would
        for p in model.image_encoder.parameters():
            p.add_(1.0)
    model.momentum_update()
    for old, new, student in zip(before, model.momentum_encoder.parameters(), model.image_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)


def test_no_momentum_encoder_without_the_mask_loss(tokenizer):
    model = build_model(tiny_config(losses=["contrastive"]), tokenizer=tokenizer)
    assert model.momentum_encoder is None
    model.momentum_update()  # a no-op, so the engine can always call it


def assert_partners_in_the_batch_equal_extra_images(model, tokenizer) -> dict:
    """The mask loss with partners as rows of the batch (`partner_index`) equals it with the same
    partners as extra images; returns the in-batch form."""
    batch = make_batch(tokenizer)
    index = torch.tensor([2, 3, 0, -1])
    in_batch = {k: v for k, v in batch.items() if k != "partner_image"}
    in_batch.update(partner_index=index, has_partner=index >= 0)
    extra = {**batch, "partner_image": batch["image"][index.clamp(min=0)], "has_partner": index >= 0}
    torch.testing.assert_close(model(in_batch)["mask"], model(extra)["mask"])
    return in_batch


@pytest.mark.parametrize("matching,grid", [("dice", "assignment"), ("entity", "assignment"), ("dice", "tokens")])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_partners_in_the_batch_give_the_loss_of_the_same_partners_as_extra_images(tokenizer, momentum, matching, grid):
    """stage2_pairs_in_batch: a row's partner is another row (`partner_index`), whose patches,
    teacher masks (and group embeddings, for entity matching) the batch's own forward makes;
    the loss is the one the partner gives as an extra image (eval mode, so no noise tells them
    apart). Momentum 0: no momentum encoder, the image encoder is the teacher."""
    torch.manual_seed(0)
    config = tiny_config if grid == "assignment" else cluster_config  # the cluster grouping draws a finer grid
    model = build_model(config(losses=["mask"], momentum=momentum, mask_matching=matching, mask_grid=grid),
                        tokenizer=tokenizer).eval()
    assert (model.momentum_encoder is None) == (momentum == 0)
    in_batch = assert_partners_in_the_batch_equal_extra_images(model, tokenizer)
    model.train()
    model(in_batch)["loss"].backward()  # the image encoder learns from it without a momentum copy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_encoder.parameters())


# -- initialisation from files ------------------------------------------------------------------

def write_dino_checkpoint(path, width=32, depth=2, grid=6, patch=8):
    """A checkpoint in DINO's key layout (cls token, pos_embed with a class position, blocks)."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=width, depth=depth,
                            num_heads=2, patch_size=patch, img_size=grid * patch, num_classes=0)
    state = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    torch.save(state, path)
    return state


def test_dino_checkpoint_loads_into_blocks_before_and_after_grouping_with_a_report(tokenizer, tmp_path, caplog):
    path = tmp_path / "dino_vit.pth"
    state = write_dino_checkpoint(path)
    assert "cls_token" in state and "blocks.1.attn.qkv.weight" in state and "norm.weight" in state
    model = build_model(tiny_config(), tokenizer=tokenizer)
    with caplog.at_level("INFO"):
        missing, unexpected = load_dino(model.image_encoder, str(path))
    enc = model.image_encoder
    torch.testing.assert_close(enc.blocks_before[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(enc.blocks_after[0].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(enc.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    torch.testing.assert_close(enc.norm.weight, state["norm.weight"])
    # DINO's 6x6 positions (after its class position) are resampled to the model's 4x4 grid
    assert enc.pos_embed.shape == (1, 16, 32)
    assert "cls_token" in unexpected
    assert "group_token" in missing and any(k.startswith("grouping.") for k in missing)
    assert not any(k.startswith(("blocks_before.", "blocks_after.")) for k in missing)
    assert "DINO init" in caplog.text and "missing" in caplog.text


def test_dino_init_through_the_config_and_shape_mismatch_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "dino.pth"
    state = write_dino_checkpoint(path)
    model = build_model(tiny_config(vision_init=str(path)), tokenizer=tokenizer)
    torch.testing.assert_close(model.image_encoder.blocks_before[0].norm1.weight, state["blocks.0.norm1.weight"])
    wide = tmp_path / "wide.pth"
    write_dino_checkpoint(wide, width=64)
    with pytest.raises(ValueError, match="shape"):
        build_model(tiny_config(vision_init=str(wide)), tokenizer=tokenizer)


def test_text_encoder_and_tokenizer_load_from_a_local_directory(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "photo", "of", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    local = tmp_path / "tiny-bert"
    bert.save_pretrained(local)
    tok.save_pretrained(local)
    model = build_model(tiny_config(text_pretrained=str(local)))
    torch.testing.assert_close(model.text_encoder.bert.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    assert model.tokenizer.mask_token == "[MASK]"
    assert model.encode_text(["a photo of a dog"]).shape == (1, 32)


def test_parameter_counts_cover_the_parts_and_add_up(tokenizer):
    model = build_model(tiny_config(losses=["contrastive", "entity", "mask"]), tokenizer=tokenizer)
    counts = parameter_counts(model)
    parts = [v for k, v in counts.items() if k not in ("total", "trainable")]
    assert sum(parts) + 3 == counts["total"]  # + the logit scale and the grounding scale and bias
    assert counts["trainable"] == counts["total"] - counts["momentum encoder (frozen)"]
    table = parameter_table(model)
    assert "| image encoder |" in table and f"{counts['total']:,}" in table


def test_missing_vision_init_file_and_unreachable_hub_are_clear_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(tiny_config(vision_init=str(tmp_path / "dino.pth")), tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="local DINO checkpoint"):
        build_model(tiny_config(vision_init="vit_small_patch16_224.dino"), tokenizer=tokenizer)


def test_a_batch_without_the_keys_a_loss_needs_is_a_clear_error(tokenizer):
    model = build_model(tiny_config(losses=["contrastive", "mask"]), tokenizer=tokenizer)
    batch = make_batch(tokenizer)
    del batch["partner_image"]
    with pytest.raises(ValueError, match="partner_image"):
        model(batch)


def test_gumbel_noise_in_bfloat16_stays_finite_and_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 4096).bfloat16()
    hard = gumbel_softmax_over_groups(logits, tau=1.0, hard=True)
    assert hard.dtype == torch.bfloat16 and torch.isfinite(hard).all()
    assert set(hard.float().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.float().sum(dim=1), torch.ones(4, 4096))


def test_projector_normalises_a_batch_and_accepts_a_single_row_in_training():
    from ovseg.training.model.projector import Projector

    torch.manual_seed(0)
    proj = Projector(8, 16, 4).train()
    x = torch.randn(6, 3, 8) * 5 + 3  # (B, K, C): statistics over B x K rows
    assert proj(x).shape == (6, 3, 4)
    assert proj.norm.num_batches_tracked.item() == 1
    row = torch.randn(1, 8)
    in_training = proj(row)  # no batch statistics for one row: the running ones
    proj.eval()
    torch.testing.assert_close(in_training, proj(row))


# -- grounding and the conv patch embedding ---------------------------------------------------

def test_grounding_positives_are_each_images_own_entities_and_the_rest_of_the_batch_negatives(tokenizer, monkeypatch):
    import ovseg.training.model.ovsegmentor as ovsegmentor

    seen = {}

    def spy(group_embeddings, area, entities, targets, scale, bias, tau):
        seen.update(entities=entities, targets=targets, area=area)
        return group_embeddings.sum() * 0.0

    monkeypatch.setattr(ovsegmentor, "grounding_loss", spy)
    model = build_model(tiny_config(losses=["grounding"]), tokenizer=tokenizer)
    model(make_batch(tokenizer))
    # distinct entities sorted by key: circle 1, square 2, dog 3, person 4, star 5
    assert seen["entities"].shape[0] == 5
    expected = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(seen["targets"], expected)
    assert torch.allclose(seen["area"].sum(dim=1), torch.ones(4), atol=1e-5)


def test_conv_patch_embedding_gives_the_same_token_grid_and_needs_a_power_of_two_patch(tokenizer):
    model = build_model(tiny_config(patch_embed="conv", losses=["contrastive", "grounding"]), tokenizer=tokenizer)
    model.train()
    out = model(make_batch(tokenizer))
    out["loss"].backward()
    assert model.encode_image(torch.randn(2, 3, 32, 32)).assignment.shape[-2:] == (4, 4)
    assert model.image_encoder.patch_embed.stem[0].conv.weight.grad is not None
    with pytest.raises(ValueError, match="power-of-two"):
        build_model(tiny_config(patch_embed="conv", patch_size=6, image_size=36), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="linear, conv or cnn"):
        build_model(tiny_config(patch_embed="mlp"), tokenizer=tokenizer)


# -- the CNN patch embedding and the cluster grouping (the synthetic-small preset's) ----------

def cluster_config(**changes) -> ModelConfig:
    """The tiny model with synthetic-small's image encoder: a 2-stage CNN (patch 4) and the
    cluster grouping over its 16x16 low-level map."""
    return tiny_config(**{"patch_embed": "cnn", "cnn_channels": [8, 16], "patch_size": 4, "grouping": "cluster",
                          "depth_before": 0, **changes})


def test_cnn_patch_embedding_gives_the_token_grid_and_a_low_level_map_at_twice_it(tokenizer):
    model = build_model(cluster_config(grouping="learned"), tokenizer=tokenizer).eval()
    tokens, low = model.image_encoder.patch_embed(torch.randn(2, 3, 32, 40))
    assert tokens.shape == (2, 8, 10, 32) and low.shape == (2, 8, 16, 20)
    # with the learned grouping the assignment stays on the token grid
    assert model.encode_image(torch.randn(2, 3, 32, 40)).assignment.shape == (2, 4, 8, 10)
    with pytest.raises(ValueError, match="power-of-two"):
        build_model(cluster_config(patch_size=6, image_size=36), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="at least 3 stages"):
        build_model(cluster_config(patch_size=8), tokenizer=tokenizer)


def test_cluster_assignment_is_a_soft_partition_of_the_low_level_grid_with_no_gradient(tokenizer):
    torch.manual_seed(0)
    model = build_model(cluster_config(), tokenizer=tokenizer).eval()
    out = model.encode_image(torch.randn(3, 3, 32, 24))
    assert out.assignment.shape == (3, 4, 16, 12)  # the low-level map's grid, not the 8x6 tokens
    torch.testing.assert_close(out.assignment.sum(dim=1), torch.ones(3, 16, 12))
    assert not out.assignment.requires_grad  # no loss can reach the assignment
    assert out.group_embeddings.requires_grad  # the groups still pool tokens with gradient


def test_patches_that_look_alike_share_a_group_and_a_different_region_gets_its_own():
    """Soft k-means over the keys: two flat regions of very different colour (the low-level
    part of the keys) fall in different groups, each region in one group."""
    from ovseg.training.model.grouping import ClusterAssign, ClusterSettings

    torch.manual_seed(0)
    assign = ClusterAssign(dim=16, low_dim=3, settings=ClusterSettings(iters=5, tau=0.05, low_weight=1.0,
                                                                        token_weight=0.0, position_weight=0.0))
    low = torch.zeros(1, 3, 8, 8)
    low[:, 0, :, :4] = 1.0   # left half red
    low[:, 2, :, 4:] = 1.0   # right half blue
    x = torch.randn(1, 16, 16)  # 4x4 tokens, upsampled to the 8x8 map
    queries = torch.randn(1, 4, 16)
    _, soft, _, grid = assign(queries, x, (4, 4), low)
    labels = soft.argmax(dim=1).view(8, 8)
    assert grid == (8, 8)
    assert labels[:, :4].unique().numel() == 1 and labels[:, 4:].unique().numel() == 1
    assert labels[0, 0] != labels[0, 7]


def textbook_cluster(assign, queries, x, grid, low):
    """ClusterAssign written the slow, obvious way: F.normalize, full squared distances
    (torch.cdist), and the values upsampled to the key grid before pooling."""
    import torch.nn.functional as F

    from ovseg.training.model.grouping import grid_positions

    st = assign.settings
    b, _, c = x.shape
    size = tuple(low.shape[-2:])
    tokens = F.interpolate(x.transpose(1, 2).reshape(b, c, *grid), size=size, mode="bilinear",
                           align_corners=False).flatten(2)
    keys = torch.cat([st.low_weight * F.normalize(low.flatten(2), dim=1), st.token_weight * F.normalize(tokens, dim=1),
                      st.position_weight * grid_positions(*size).T[None].expand(b, -1, -1)], dim=1).transpose(1, 2)
    free = keys.detach()
    seed = F.normalize(assign.seed(queries), dim=-1)
    soft = (seed @ F.normalize(free, dim=-1).transpose(1, 2) / st.tau).softmax(dim=1)
    for _ in range(st.iters):
        centres = (soft / (soft.sum(-1, keepdim=True) + 1e-6)) @ free
        soft = (-torch.cdist(centres, free).pow(2) / st.tau).softmax(dim=1)
    centres = (soft / (soft.sum(-1, keepdim=True) + 1e-6)) @ keys
    attn = soft / (soft.sum(dim=-1, keepdim=True) + 1.0)
    merged = assign.proj(attn @ assign.v_proj(tokens.transpose(1, 2)))
    return merged, soft, centres


def test_the_cluster_grouping_equals_the_textbook_soft_k_means_with_its_gradients():
    """ClusterAssign skips the keys' own norms (they cancel in the softmax over groups), pools
    the values on the token grid through the upsampling matrix, and scales the keys by a
    broadcast rsqrt: the same assignment, groups, centres and input gradient as the obvious
    implementation. Its cross-image masks compare the token parts alone."""
    import torch.nn.functional as F

    from ovseg.training.model.grouping import ClusterAssign, ClusterSettings

    torch.manual_seed(0)
    assign = ClusterAssign(dim=16, low_dim=8, settings=ClusterSettings(iters=3, tau=0.1, low_weight=1.0,
                                                                        token_weight=2.0, position_weight=0.5))
    x = torch.randn(3, 20, 16, requires_grad=True)  # a 4x5 token grid, upsampled to the 8x10 map
    low, queries = torch.randn(3, 8, 8, 10), torch.randn(3, 6, 16)
    merged, soft, centres, grid = assign(queries, x, (4, 5), low)
    (merged.square().sum() + centres.square().sum()).backward()
    fast_grad, x.grad = x.grad, None
    ref_merged, ref_soft, ref_centres = textbook_cluster(assign, queries, x, (4, 5), low)
    (ref_merged.square().sum() + ref_centres.square().sum()).backward()
    assert grid == (8, 10)
    torch.testing.assert_close(soft, ref_soft, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, ref_merged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(centres, ref_centres, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast_grad, x.grad, atol=1e-5, rtol=1e-4)
    # cross-image masks: the partner's unit tokens, upsampled, against the centres' token part
    other = torch.randn(3, 20, 16)
    unit_tokens = 2.0 * F.normalize(other.transpose(1, 2).reshape(3, 16, 4, 5), dim=1)
    partner = F.interpolate(unit_tokens, size=(8, 10), mode="bilinear", align_corners=False).flatten(2)
    distance = torch.cdist(centres.detach()[..., 8:24], partner.transpose(1, 2)).pow(2)
    masks = assign.masks(centres.detach(), other, (4, 5), low)
    torch.testing.assert_close(masks, (-distance / 0.1).softmax(dim=1), atol=1e-5, rtol=1e-4)
    # they ignore the partner's colour and position: another low-level map gives the same masks
    torch.testing.assert_close(assign.masks(centres.detach(), other, (4, 5), torch.randn(3, 8, 8, 10)), masks)


def test_colour_keys_split_two_flat_colours_that_the_tokens_and_low_level_map_cannot_tell_apart():
    """With a pixel weight the image's own colour is part of the keys: two flat regions whose
    tokens and low-level features are identical still fall into two groups, split exactly at
    the colour border, and without it they cannot be told apart."""
    from ovseg.training.model.grouping import ClusterAssign, ClusterSettings

    pixels = torch.zeros(1, 3, 8, 8)
    pixels[:, 0, :, :3] = 2.0  # a red band three cells wide: the border is off the 4x4 token grid
    x, low = torch.ones(1, 16, 16), torch.ones(1, 3, 8, 8)  # identical tokens and low-level features
    queries = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    labels = {}
    for weight in (0.0, 2.0):
        torch.manual_seed(0)
        assign = ClusterAssign(dim=16, low_dim=3, settings=ClusterSettings(
            iters=5, tau=0.05, low_weight=1.0, token_weight=1.0, position_weight=0.0, pixel_weight=weight))
        _, soft, _, grid = assign(queries, x, (4, 4), low, pixels)
        assert grid == (8, 8)
        labels[weight] = soft.argmax(dim=1).view(8, 8)
    coloured = labels[2.0]
    assert coloured[:, :3].unique().numel() == 1 and coloured[:, 3:].unique().numel() == 1
    assert coloured[0, 0] != coloured[0, 7]
    assert labels[0.0].unique().numel() == 1  # every key equal: nothing to split by


def test_a_finer_cluster_stride_draws_the_group_maps_on_that_grid_and_equals_upsampled_keys(tokenizer):
    """cluster_stride=1 clusters on the low-level map, then assigns every input pixel to the
    centres: the fine assignment equals the squared-distance softmax over keys whose
    low-level and token parts are resampled to the pixel grid, and the model's maps are
    drawn at the input's resolution."""
    import torch.nn.functional as F

    from ovseg.training.model.grouping import ClusterAssign, ClusterSettings, _unit, grid_positions

    torch.manual_seed(0)
    settings = ClusterSettings(iters=3, tau=0.1, low_weight=1.0, token_weight=2.0, position_weight=0.5,
                               pixel_weight=1.5)
    assign = ClusterAssign(dim=16, low_dim=8, settings=settings)
    x = torch.randn(2, 20, 16, requires_grad=True)  # 4x5 tokens, 8x10 low-level map, 16x20 pixels
    low, pixels, queries = torch.randn(2, 8, 8, 10), torch.randn(2, 3, 16, 20), torch.randn(2, 6, 16)
    _, soft, centres, grid = assign(queries, x, (4, 5), low, pixels)
    assert grid == (16, 20) and soft.shape == (2, 6, 320)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(2, 320))

    def up(m):
        return F.interpolate(m, size=(16, 20), mode="bilinear", align_corners=False).flatten(2)

    tokens = x.detach().transpose(1, 2).reshape(2, 16, 4, 5)
    keys = torch.cat([up(_unit(low.flatten(2), 1.0).view(2, 8, 8, 10)), up(_unit(tokens.flatten(2), 2.0).view(2, 16, 4, 5)),
                      1.5 * pixels.flatten(2), 0.5 * grid_positions(16, 20).T[None].expand(2, -1, -1)], dim=1)
    expected = (-torch.cdist(centres.detach(), keys.transpose(1, 2)).pow(2) / 0.1).softmax(dim=1)
    torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-4)
    # the partner's masks for mask consistency are drawn on the same grid, with gradient
    masks = assign.masks(centres, torch.randn(2, 20, 16), (4, 5), low, pixels)
    assert masks.shape == (2, 6, 320) and masks.requires_grad

    model = build_model(cluster_config(cluster_stride=1, cluster_pixel_weight=1.0), tokenizer=tokenizer).eval()
    out = model.encode_image(torch.randn(2, 3, 32, 24))
    assert out.assignment.shape == (2, 4, 32, 24)
    with pytest.raises(ValueError, match="cluster_stride"):
        build_model(cluster_config(cluster_stride=3), tokenizer=tokenizer)


@pytest.mark.slow
def test_a_loss_that_rewards_one_big_group_collapses_the_learned_grouping_but_cannot_move_the_cluster_one(tokenizer):
    """The failure the cluster grouping exists for (docs/recipes.md): gradient through a learned
    assignment can fold every patch into one group; without a path to the assignment, the
    same pressure changes nothing."""
    def largest_share(model, images):  # in training mode: batch norm uses these images' statistics
        with torch.no_grad():
            return model.encode_image(images).assignment.flatten(2).mean(-1).max(dim=1).values.mean().item()

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    shares = {}
    for grouping in ("learned", "cluster"):
        torch.manual_seed(0)
        model = build_model(cluster_config(grouping=grouping, hard_assignment=False), tokenizer=tokenizer)
        model.train()
        before = largest_share(model, images)
        trainable = [p for p in model.image_encoder.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=1e-2)
        for _ in range(30):
            area = model.encode_image(images).assignment.flatten(2).mean(-1)  # (B, K)
            loss = -area.max(dim=1).values.mean()
            if loss.requires_grad:
                opt.zero_grad()
                loss.backward()
                opt.step()
        shares[grouping] = (before, largest_share(model, images))
    learned_before, learned_after = shares["learned"]
    assert learned_after > max(0.9, learned_before + 0.2), shares
    cluster_before, cluster_after = shares["cluster"]
    assert abs(cluster_after - cluster_before) < 1e-6, shares


def test_cross_image_masks_of_the_cluster_grouping_train_the_cnn(tokenizer):
    torch.manual_seed(0)
    model = build_model(cluster_config(losses=["mask"]), tokenizer=tokenizer)
    model.train()
    out = model(make_batch(tokenizer))
    out["mask"].backward()
    stem = model.image_encoder.patch_embed
    assert stem.head.weight.grad is not None and stem.head.weight.grad.abs().sum() > 0
    assert stem.stages[-1][0].conv.weight.grad.abs().sum() > 0


def test_token_grid_masks_are_the_assignment_grid_masks_before_upsampling(tokenizer):
    """model.mask_grid=tokens: the cross-image masks on the token grid, whose logits upsampled
    bilinearly give the masks on the grid the groups are drawn on (the low-level map's)."""
    torch.manual_seed(0)
    model = build_model(cluster_config(losses=["mask"], mask_grid="tokens"), tokenizer=tokenizer).eval()
    with torch.no_grad():
        enc = model.encode_image(make_batch(tokenizer)["image"])
        x = enc.inputs
        coarse = model.image_encoder.grouping.masks(enc.anchors, x.patches, x.grid, x.low, x.pixels, fine=False)
        fine = model.image_encoder.grouping.masks(enc.anchors, x.patches, x.grid, x.low, x.pixels)
    b, k = enc.anchors.shape[:2]
    (h, w), (fh, fw) = x.grid, enc.assignment.shape[-2:]
    assert coarse.shape == (b, k, h * w) and fine.shape == (b, k, fh * fw) and fh > h
    logits = torch.nn.functional.interpolate(coarse.log().view(b, k, h, w), size=(fh, fw), mode="bilinear",
                                             align_corners=False)
    torch.testing.assert_close(logits.softmax(dim=1).flatten(2), fine, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown mask grid"):
        build_model(cluster_config(losses=["mask"], mask_grid="pixels"), tokenizer=tokenizer)


CLUSTER_SEED_PATH = ("image_encoder.group_token", "image_encoder.grouping.norm_tokens.",
                     "image_encoder.grouping.mlp_inter.", "image_encoder.grouping.norm_post_tokens.",
                     "image_encoder.grouping.pre_assign.", "image_encoder.grouping.assign.seed.")


@pytest.mark.parametrize("loss", ["contrastive", "entity", "grounding", "mask"])
def test_under_the_cluster_grouping_every_parameter_but_the_seeding_path_gets_a_gradient(tokenizer, loss):
    """The group queries only seed the gradient-free clustering, so their path gets no gradient
    by design; everything else each loss reaches must move."""
    torch.manual_seed(0)
    model = build_model(cluster_config(losses=[loss]), tokenizer=tokenizer)
    model.train()
    model(make_batch(tokenizer))["loss"].backward()
    unreached = UNREACHED[loss] + CLUSTER_SEED_PATH
    if loss == "mask":  # the mask loss reads the patch tokens and the centres, not the pooled groups
        unreached += ("image_encoder.grouping.assign.v_proj.", "image_encoder.grouping.assign.proj.")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(CLUSTER_SEED_PATH):
            assert p.grad is None or p.grad.abs().sum() == 0, f"{name} should get no gradient"
            continue
        if name.startswith(unreached) or "word_embeddings" in name:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} got no finite gradient from {loss}"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient under the {loss} loss"


# -- the official entity decoder and mask loss ------------------------------------------------------

def official_config(**changes) -> ModelConfig:
    settings = dict(decoder="official", decoder_heads=2, decoder_padding_mask=False, mask_form="official", momentum=0.9)
    return tiny_config(**{**settings, **changes})


def test_the_official_decoder_is_one_post_norm_cross_block_then_self_attention_and_a_bridge_projector(tokenizer):
    from ovseg.training.model.entity_decoder import OfficialEntityDecoder

    model = build_model(official_config(losses=["entity"], decoder_depth=1), tokenizer=tokenizer)
    dec = model.entity_decoder
    assert isinstance(dec, OfficialEntityDecoder) and len(dec.layers) == 1
    layer = dec.layers[0]
    assert layer.cross.post_norm and layer.cross.attn.heads == 2 and layer.self_attn.attn.heads == 2
    # equal widths: no alignment; the bridge projector has the projectors' shape
    assert isinstance(dec.align_proj_img, torch.nn.Identity) and isinstance(dec.align_proj_text, torch.nn.Identity)
    assert [tuple(p.shape) for p in dec.bridge_projector.parameters()] == \
        [tuple(p.shape) for p in model.image_projector.parameters()]
    # the wider side is brought down to the narrower one
    wide_text = build_model(official_config(losses=["entity"], text_width=48, text_heads=2), tokenizer=tokenizer)
    dec = wide_text.entity_decoder
    assert isinstance(dec.align_proj_img, torch.nn.Identity)
    assert (dec.align_proj_text.in_features, dec.align_proj_text.out_features) == (48, 32)


def test_the_official_decoder_layer_adds_the_cross_attended_tokens_after_self_attention_and_normalises():
    """With the self-attention block made the identity, a layer's output is the final norm of
    twice the cross-attended question (the official residual); a later layer adds the previous
    layer's output before its self-attention."""
    from ovseg.training.model.entity_decoder import OfficialDecoderLayer

    torch.manual_seed(0)
    layer = OfficialDecoderLayer(16, 2).eval()
    with torch.no_grad():
        for p in list(layer.self_attn.attn.proj.parameters()) + list(layer.self_attn.mlp.fc2.parameters()):
            p.zero_()
    q, g = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    attended = layer.cross(layer.norm_tokens(q), layer.norm_x(g))
    torch.testing.assert_close(layer(None, q, g, None), layer.norm_out(2 * attended))
    torch.testing.assert_close(layer(q, q, g, None), layer.norm_out(2 * attended + q))


@pytest.mark.parametrize("honour", [True, False])
def test_the_question_padding_mask_is_its_own_setting(tokenizer, honour):
    """The official attention ignores the padding mask (padding then changes the answer);
    `decoder_padding_mask` honours it."""
    torch.manual_seed(0)
    model = build_model(official_config(losses=["entity"], decoder_padding_mask=honour), tokenizer=tokenizer).eval()
    groups = torch.randn(2, 4, 32)
    texts = ["a red [MASK]", "a [MASK] and a person"]
    short = tokenizer(texts, padding=True, return_tensors="pt")
    long = tokenizer(texts, padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        a = model.entity_decoder(model.text_features(short["input_ids"], short["attention_mask"]),
                                 short["attention_mask"], groups)
        b = model.entity_decoder(model.text_features(long["input_ids"], long["attention_mask"]),
                                 long["attention_mask"], groups)
    assert torch.allclose(a, b, atol=1e-5) == honour


def test_official_student_masks_are_the_images_queries_on_the_partners_momentum_keys(tokenizer):
    torch.manual_seed(0)
    model = build_model(official_config(losses=["mask"]), tokenizer=tokenizer).eval()  # eval: no dropout
    batch = make_batch(tokenizer)
    image = model.encode_image(batch["image"])
    student, teacher, relevance, has, size = model.official_mask_inputs(image, batch)
    assert student.shape == teacher.shape == (4, 4, 4, 4) and size == (32, 32)  # (B, K, h, w), the input size
    assert student.requires_grad and not teacher.requires_grad and not relevance.requires_grad
    with torch.no_grad():  # the keys are the momentum encoder's: moving the online keys changes nothing
        model.image_encoder.grouping.assign.k_proj.weight.add_(1.0)
    again = model.official_mask_inputs(image, batch)[0]
    torch.testing.assert_close(again, student)
    with torch.no_grad():
        model.momentum_encoder.grouping.assign.k_proj.weight.add_(1.0)
    assert not torch.allclose(model.official_mask_inputs(image, batch)[0], student)
    # relevance: the image's projected (unnormalised) groups against the projected shared entity
    with torch.no_grad():
        shared = model.project_text(batch["shared_ids"], batch["shared_mask"])
    torch.testing.assert_close(relevance, torch.einsum("bkd,bd->bk", image.group_projected, shared))


def test_official_mask_loss_trains_the_images_query_path_and_not_the_keys(tokenizer):
    torch.manual_seed(0)
    model = build_model(official_config(losses=["mask"]), tokenizer=tokenizer).train()
    out = model(make_batch(tokenizer))
    assert torch.isfinite(out["mask"])
    out["loss"].backward()
    assign = model.image_encoder.grouping.assign
    assert assign.q_proj.weight.grad.abs().sum() > 0
    assert model.image_encoder.group_token.grad.abs().sum() > 0
    assert assign.k_proj.weight.grad is None  # the keys come from the momentum encoder
    assert all(p.grad is None for p in model.momentum_encoder.parameters())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_official_mask_loss_with_partners_in_the_batch_equals_partners_as_extra_images(tokenizer, momentum):
    torch.manual_seed(0)
    model = build_model(official_config(losses=["mask"], momentum=momentum), tokenizer=tokenizer).eval()
    assert_partners_in_the_batch_equal_extra_images(model, tokenizer)


def test_official_mask_form_needs_the_learned_grouping(tokenizer):
    with pytest.raises(ValueError, match="learned grouping"):
        build_model(cluster_config(losses=["mask"], mask_form="official"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="model.decoder"):
        build_model(tiny_config(losses=["entity"], decoder="paper"), tokenizer=tokenizer)


# -- the grouping block as GroupViT and OVSegmentor have it ---------------------------------------

def test_group_queries_cross_attend_to_the_image_tokens_not_to_the_group_tokens(tokenizer):
    """The pre-assign cross-attention reads the normalised patch tokens: other patches with the
    same group tokens give other queries (the block once attended to the group tokens)."""
    torch.manual_seed(0)
    grouping = build_model(tiny_config(), tokenizer=tokenizer).image_encoder.grouping.eval()
    tokens = torch.randn(2, 8, 32)  # (B, G, C)
    a = grouping.queries(tokens, grouping.norm_x(torch.randn(2, 16, 32)))
    b = grouping.queries(tokens, grouping.norm_x(torch.randn(2, 16, 32)))
    assert a.shape == (2, 4, 32)
    assert not torch.allclose(a, b, atol=1e-4)
    # post-norm: the queries leave the block normalised (the block's last LayerNorm)
    torch.testing.assert_close(a.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def two_stage_config(**changes) -> ModelConfig:
    """GroupViT's shape at test size: 8 groups, then a stage of 2 blocks that groups them into 2."""
    return tiny_config(**{"num_group_tokens": 8, "num_groups": 8, "extra_stage_depths": [2],
                          "extra_stage_group_tokens": [4], "extra_stage_groups": [2], "patch_norm": True, **changes})


def test_a_second_grouping_stage_composes_the_assignment_over_both_stages(tokenizer):
    torch.manual_seed(0)
    model = build_model(two_stage_config(), tokenizer=tokenizer).eval()
    enc = model.image_encoder
    images = torch.randn(3, 3, 32, 32)
    out = model.encode_image(images)
    assert out.group_embeddings.shape == (3, 2, 32) and out.assignment.shape == (3, 2, 4, 4)
    torch.testing.assert_close(out.assignment.sum(dim=1), torch.ones(3, 4, 4))
    # the composition, by hand: the first stage's soft map, then the second's over its groups
    x = enc.before_grouping(images)
    groups, first, _, _ = enc.grouping(x.patches, x.group_tokens, x.grid)  # (B, 8, C), (B, 8, 16)
    _, second, _ = enc.stages[0](groups, x.group_tokens)  # (B, 2, 8)
    torch.testing.assert_close(out.assignment.flatten(2), second @ first)
    # the later stage's own group tokens start at zero: only the mixed earlier tokens seed it
    assert torch.count_nonzero(enc.stages[0].group_token) == 0


def test_extra_stage_lists_must_agree_and_need_the_learned_grouping(tokenizer):
    with pytest.raises(ValueError, match="one entry per extra grouping stage"):
        build_model(two_stage_config(extra_stage_groups=[]), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="grouping=learned"):
        build_model(two_stage_config(grouping="cluster", patch_norm=False, patch_embed="cnn", cnn_channels=[8, 16],
                                     patch_size=4, depth_before=0), tokenizer=tokenizer)


def test_drop_path_rises_linearly_over_every_block_of_every_stage(tokenizer):
    enc = build_model(two_stage_config(drop_path=0.3), tokenizer=tokenizer).image_encoder
    blocks = [*enc.blocks_before, *enc.stages[0].blocks, *enc.blocks_after]  # 1 + 2 + 1 blocks
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_dino_blocks_fill_every_stage_in_order(tokenizer, tmp_path):
    enc = build_model(two_stage_config(), tokenizer=tokenizer).image_encoder
    from ovseg.training.model.image_encoder import block_names

    assert block_names(enc) == ["blocks_before.0", "stages.0.blocks.0", "stages.0.blocks.1", "blocks_after.0"]
    state = {f"blocks.{i}.norm1.weight": torch.full((32,), float(i)) for i in range(5)}
    path = tmp_path / "dino.pth"
    torch.save(state, path)
    missing, unexpected = load_dino(enc, str(path))
    assert enc.stages[0].blocks[1].norm1.weight.detach()[0] == 2.0 and enc.blocks_after[0].norm1.weight.detach()[0] == 3.0
    assert unexpected == ["blocks.4.norm1.weight"]  # more DINO blocks than the encoder has


@pytest.mark.parametrize("cluster", [False, True])
def test_a_seed_draws_the_grouping_block_s_weights_in_the_order_its_parts_are_listed(cluster):
    """The assigner interface must not move the random draws: a seed gives the same initial
    model as before it (pre_assign's weights are drawn before the assigner's)."""
    from timm.layers import Mlp

    from ovseg.training.model.attention import CrossAttentionBlock
    from ovseg.training.model.grouping import AssignAttention, ClusterAssign, ClusterSettings, GroupingBlock

    settings = ClusterSettings(iters=2, tau=0.1, low_weight=1.0, token_weight=1.0, position_weight=0.5) if cluster else None
    torch.manual_seed(3)
    block = GroupingBlock(16, 2, 8, 4, cluster=settings, low_dim=4)
    torch.manual_seed(3)
    mlp_inter = Mlp(8, 8, 4)
    pre_assign = CrossAttentionBlock(16, 2, 4.0, post_norm=not cluster)
    assign = ClusterAssign(16, 4, settings) if cluster else AssignAttention(16)
    mlp_channels = Mlp(16, 64, 16)
    for name, part in (("mlp_inter", mlp_inter), ("pre_assign", pre_assign), ("assign", assign),
                       ("mlp_channels", mlp_channels)):
        for key, value in part.state_dict().items():
            torch.testing.assert_close(block.state_dict()[f"{name}.{key}"], value, rtol=0, atol=0)


def test_centred_assignment_logits_reach_the_official_mask_loss_too(tokenizer):
    """With model.assign_center the official mask loss reads the logits the assignment reads:
    each group's mean over the patches removed, for the student and the teacher alike."""
    torch.manual_seed(0)
    plain = build_model(official_config(losses=["mask"]), tokenizer=tokenizer).eval()
    centred = build_model(official_config(losses=["mask"], assign_center=True), tokenizer=tokenizer).eval()
    centred.load_state_dict(plain.state_dict())
    batch = make_batch(tokenizer)
    student, teacher = plain.official_mask_inputs(plain.encode_image(batch["image"]), batch)[:2]
    s, t = centred.official_mask_inputs(centred.encode_image(batch["image"]), batch)[:2]
    for raw, moved in ((student, s), (teacher, t)):
        assert torch.allclose(moved.flatten(2).mean(-1), torch.zeros(moved.shape[:2]), atol=1e-5)
        torch.testing.assert_close(moved, raw - raw.flatten(2).mean(-1)[..., None, None], atol=1e-5, rtol=1e-5)

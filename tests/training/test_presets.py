"""Presets by name: every one builds a model config, the CPU presets a working model, and the
`paper` preset has the paper's architecture (ViT-B/16 blocks, BERT-base)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ovseg.training.model import ModelConfig, build_model, parameter_counts  # noqa: E402
from ovseg.training.model.image_encoder import assignment_grid  # noqa: E402
from ovseg.training.presets import get_preset, list_presets  # noqa: E402
from ovseg.training.config import ConfigError  # noqa: E402
from ovseg.training.tokenizer import train_wordpiece  # noqa: E402

torch.set_num_threads(1)


def test_registry_lists_the_paper_and_cpu_presets():
    assert {"paper", "synthetic-small", "test"} <= set(list_presets())


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'; available: .*synthetic-small"):
        get_preset("no-such-preset")


@pytest.mark.parametrize("name", list_presets())
def test_every_presets_model_section_is_a_valid_model_config(name):
    model = get_preset(name)["model"]
    unknown = set(model) - {f.name for f in dataclasses.fields(ModelConfig)}
    assert not unknown, f"{name}: keys ModelConfig does not have: {unknown}"
    cfg = ModelConfig(**model)
    assert cfg.image_size % cfg.patch_size == 0 and cfg.width % cfg.heads == 0
    assert cfg.num_groups <= cfg.num_group_tokens


@pytest.mark.parametrize("name", ["test", "synthetic-small"])
def test_cpu_presets_build_and_train_a_step(name):
    cfg = dataclasses.replace(ModelConfig(**get_preset(name)["model"]), losses=["contrastive", "entity", "mask"])
    tok = train_wordpiece(["a red circle and a blue square", "a green star"], vocab_size=100, min_frequency=1)
    model = build_model(cfg, tokenizer=tok)
    b, s = 2, cfg.image_size
    text = tok(["a red circle", "a star"], padding=True, return_tensors="pt")
    ids, mask = text["input_ids"], text["attention_mask"]
    batch = {"image": torch.randn(b, 3, s, s), "partner_image": torch.randn(b, 3, s, s),
             "input_ids": ids, "attention_mask": mask, "question_ids": ids, "question_mask": mask,
             "answer_ids": ids, "answer_mask": mask, "shared_ids": ids, "shared_mask": mask,
             "has_entity": torch.ones(b, dtype=torch.bool), "has_partner": torch.ones(b, dtype=torch.bool)}
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grid = assignment_grid(cfg)
    assert grid == (s if name == "synthetic-small" else s // cfg.patch_size)  # clustering: drawn at every input pixel
    assert model.encode_image(batch["image"]).assignment.shape == (b, cfg.num_groups, grid, grid)


def test_paper_preset_has_vit_b16_blocks_and_bert_base():
    import timm
    from transformers import BertConfig, BertModel

    cfg = ModelConfig(**get_preset("paper")["model"])
    assert (cfg.width, cfg.depth_before, cfg.depth_after, cfg.num_group_tokens, cfg.num_groups) == (768, 6, 6, 64, 8)
    assert (cfg.proj_hidden, cfg.embed_dim, cfg.text_pretrained) == (4096, 256, "bert-base-uncased")
    # offline: the same architecture with random weights, on the meta device (no memory)
    cfg = dataclasses.replace(cfg, text_pretrained=None, vision_init=None, text_vocab_size=30522)
    with torch.device("meta"):
        model = build_model(cfg)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        # BERT-base; a random-init encoder has positions for max_text_length tokens only
        bert = BertModel(BertConfig(max_position_embeddings=cfg.max_text_length), add_pooling_layer=False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    enc = model.image_encoder
    vit_blocks = n(vit.blocks) + n(vit.patch_embed) + n(vit.norm)
    assert n(enc.blocks_before) + n(enc.blocks_after) + n(enc.patch_embed) + n(enc.norm) == vit_blocks
    assert enc.pos_embed.shape == (1, 196, 768) and enc.group_token.shape == (1, 64, 768)
    counts = parameter_counts(model)
    assert counts["text encoder"] == n(bert)
    assert counts["image projector"] == (768 * 4096 + 4096) + 2 * 4096 + (4096 * 256 + 256)  # fc1, batch norm, fc2


def test_paper_preset_is_the_official_configuration():
    from ovseg.training.config import resolve

    cfg = resolve("paper")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.heads, m.decoder, m.decoder_depth, m.decoder_heads, m.decoder_padding_mask) == (8, "official", 1, 8, False)
    assert (m.drop_path, m.patch_norm, m.grouping, m.hard_assignment) == (0.1, False, "learned", True)
    assert (m.mask_form, m.mask_group_ratio, m.mask_relative_threshold, m.momentum) == ("official", 0.5, 0.6, 0.99)
    assert (m.loss_weights["contrastive"], m.loss_weights["entity"], m.loss_weights["mask"]) == (1.0, 1.0, 0.1)
    one, two = t.stages
    assert (one.losses, two.losses) == (["contrastive", "entity"], ["contrastive", "entity", "mask"])
    assert (o.lr, o.warmup_lr, o.min_lr, o.warmup_epochs, o.schedule) == (6.4e-4, 1.6e-5, 1.6e-4, 2, "official")
    assert (two.lr, two.min_lr, two.warmup_epochs) == (1e-5, 1e-6, 0)
    assert (o.betas, o.eps, o.weight_decay, o.no_decay, o.clip_grad, o.scale_lr) == (
        (0.9, 0.999), 1e-8, 0.05, "official", 5.0, True)
    assert (one.global_batch, two.global_batch, one.epochs, two.epochs) == (2048, 1024, 30, 10)
    assert (two.freeze_text, two.partners, t.ema_decay) == (True, "extra", 0.0)
    assert (one.crop, one.augment, two.crop, two.augment) == (0.08, "deit", 0.4, "crop_flip")
    assert (d.randaugment, d.color_jitter, d.random_erasing) == ("rand-m9-mstd0.5-inc1", 0.4, 0.25)


def test_every_paper_preset_field_says_what_the_official_files_say():
    text = (Path(__file__).resolve().parents[2] / "training" / "presets" / "paper.yaml").read_text()
    fields = [line for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith("#")]
    assert fields and all("#" in line for line in fields), [line for line in fields if "#" not in line]


@pytest.mark.parametrize("name", ["synthetic-small", "test"])
def test_cpu_presets_keep_ovsegs_decoder_mask_loss_and_schedule(name):
    from ovseg.training.config import resolve

    cfg = resolve(name)
    assert (cfg.model.decoder, cfg.model.mask_form, cfg.optim.schedule, cfg.optim.no_decay) == (
        "ovseg", "ovseg", "ovseg", "ovseg")

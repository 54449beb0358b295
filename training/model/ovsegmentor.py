"""OVSegmentor: the top model wires the image encoder, text encoder, projectors and losses.
Which losses run is `cfg.losses`; the model holds no stage flags."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.training.losses import (
    MaskConsistencyLoss, OfficialMaskConsistencyLoss, contrastive_loss, entity_completion_loss, grounding_loss,
)
from ovseg.training.model import noise
from ovseg.training.model.config import ModelConfig
from ovseg.training.model.entity_decoder import build_entity_decoder
from ovseg.training.model.image_encoder import GroupingInput, GroupingViT
from ovseg.training.model.projector import Projector
from ovseg.training.model.text_encoder import TextEncoder

LOSS_NAMES = ("contrastive", "entity", "grounding", "mask")
BATCH_KEYS = {  # what each loss reads from the batch (docs/architecture.md)
    "contrastive": ("image", "input_ids", "attention_mask"),
    "entity": ("image", "question_ids", "question_mask", "answer_ids", "answer_mask", "has_entity"),
    "grounding": ("image", "entity_prompt_ids", "entity_prompt_mask", "entity_keys"),
    # and the partner: `partner_image` (an extra image) or `partner_index` (a row of the batch)
    "mask": ("image", "shared_ids", "shared_mask", "has_partner"),
}


# the mask loss's parts without gradient, which a re-run of the same batch can reuse
REUSABLE = ("teacher", "partner_groups", "shared", "keys")


@dataclass
class ImageEncoding:
    embedding: torch.Tensor         # (B, D) normalised image embedding
    group_embeddings: torch.Tensor  # (B, K, D) normalised group embeddings
    assignment: torch.Tensor        # (B, K, h, w) soft patch-to-group assignment
    groups: torch.Tensor            # (B, K, C) group tokens before the projector
    anchors: torch.Tensor           # (B, K, C') each group's anchor (`Assignment.anchors`: the learned grouping's queries, the clustering's centres)
    inputs: GroupingInput           # what entered the grouping block
    group_projected: torch.Tensor | None = None  # (B, K, D) group tokens through the projector, not normalised


class OVSegmentor(nn.Module):
    def __init__(self, cfg: ModelConfig, image_encoder: GroupingViT, text_encoder: TextEncoder,
                 image_projector: nn.Module, text_projector: nn.Module, tokenizer,
                 entity_decoder: nn.Module | None = None,
                 mask_loss: MaskConsistencyLoss | OfficialMaskConsistencyLoss | None = None):
        super().__init__()
        unknown = set(cfg.losses) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; choose from {', '.join(LOSS_NAMES)}")
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_projector = image_projector
        self.text_projector = text_projector
        self.tokenizer = tokenizer
        self.entity_decoder = entity_decoder
        self.mask_loss = mask_loss
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        # the grounding loss's presence logit: scale * pooled similarity + bias (always present,
        # so checkpoints load across stages and loss choices)
        self.grounding_scale = nn.Parameter(torch.tensor(float(cfg.grounding_scale_init)))
        self.grounding_bias = nn.Parameter(torch.tensor(float(cfg.grounding_bias_init)))
        # the momentum (EMA) image encoder exists only when the mask-consistency loss is on and
        # `momentum` > 0 (0: the teacher is the image encoder itself, without gradient)
        self.momentum_encoder = None
        if mask_loss is not None and cfg.momentum > 0:
            self.momentum_encoder = copy.deepcopy(image_encoder).requires_grad_(False)
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.image_mean = tuple(cfg.image_mean)
        self.image_std = tuple(cfg.image_std)

    # -- encoders -------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    def encode_image(self, images: torch.Tensor) -> ImageEncoding:
        out = self.image_encoder(images)
        # the image embedding is the mean of the groups through the projector (the paper); each
        # group through the same projector is what segmentation compares with class prompts
        embedding = F.normalize(self.image_projector(out.groups.mean(dim=1)), dim=-1)  # (B, D)
        projected = self.image_projector(out.groups)  # (B, K, D)
        return ImageEncoding(embedding, F.normalize(projected, dim=-1), out.assignment, out.groups, out.anchors,
                             out.inputs, projected)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)  # (B, L, Ct)

    def sentence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence token's features (BERT's [CLS], CLIP's end-of-text) (B, Ct)."""
        return self.text_encoder.pool(self.text_features(input_ids, attention_mask), input_ids)

    def project_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence token through the text projector, not normalised (B, D)."""
        return self.text_projector(self.sentence(input_ids, attention_mask))

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project_text(input_ids, attention_mask), dim=-1)  # (B, D)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: build it with one to encode text")
        device = self.logit_scale.device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_text_length,
                             return_tensors="pt")
        return self.embed_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))

    # -- momentum encoder -----------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        if self.momentum_encoder is None:
            return
        m = self.cfg.momentum
        for teacher, student in zip(self.momentum_encoder.parameters(), self.image_encoder.parameters()):
            teacher.mul_(m).add_(student.detach(), alpha=1 - m)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the image encoder into the momentum encoder (start of stage 2)."""
        if self.momentum_encoder is not None:
            self.momentum_encoder.load_state_dict(self.image_encoder.state_dict())

    # -- training -------------------------------------------------------------------------------
    # The step is split in two so that gradient caching (training/gradcache.py) can run the first
    # part per micro-batch and the second over the whole step: `embed` computes what belongs to
    # each sample alone; `batch_losses` everything that couples the rows of the batch (the
    # projectors' batch norm, the contrastive and entity negatives, the grounding's batch of
    # entities, the mask loss's mean). `forward` is the two in a row.

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.batch_losses(self.embed(batch))

    def embed(self, batch: dict, reuse: dict | None = None) -> dict:
        """The batch's per-sample parts, each with one row per sample (B, ...) except the
        grounding's distinct entities (`entity_ids` (U,), `entity_features` (U, Ct)), a row's
        partner (`partner_index`, a row of this batch) and the mask loss's input size
        (`mask_size`). Inside `noise.per_sample` every row's noise comes from its own seed.
        `reuse`: the parts an earlier call on the same batch with the same noise returned (pass 1
        of gradient caching); the mask loss's parts without gradient (`REUSABLE`: the momentum
        teacher's, the shared entity's) are taken from it instead of computed again."""
        missing = [key for name in self.cfg.losses for key in BATCH_KEYS[name] if key not in batch]
        if missing:
            raise ValueError(f"the batch lacks {sorted(set(missing))}, needed by the losses {self.cfg.losses}")
        losses = self.cfg.losses
        image = self.image_encoder(batch["image"])
        out: dict = {"groups": image.groups}  # (B, K, C)
        if "contrastive" in losses:
            with noise.derived("caption"):
                out["caption"] = self.sentence(batch["input_ids"], batch["attention_mask"])  # (B, Ct)
        if "entity" in losses:
            with noise.derived("question"):
                question = self.text_features(batch["question_ids"], batch["question_mask"])  # (B, L, Ct)
            with noise.derived("answer"):
                out["answer"] = self.sentence(batch["answer_ids"], batch["answer_mask"])
            out["decoded"] = self.entity_decoder.decode(question, batch["question_mask"], image.groups)  # (B, C)
            out["has_entity"] = batch["has_entity"]
        if "grounding" in losses:
            keys = batch["entity_keys"]  # (B, M): a stable id per entity, -1 for an empty slot
            named = keys >= 0
            unique, first = _first_occurrences(keys[named])
            features = image.groups.new_zeros(0, self.text_encoder.width)
            if unique.numel():
                # one prompt per distinct entity; its noise is keyed by the entity, not by a row
                with noise.keyed("entity", unique):
                    features = self.sentence(batch["entity_prompt_ids"][named][first],
                                             batch["entity_prompt_mask"][named][first])  # (U, Ct)
            out.update(entity_keys=keys, entity_ids=unique, entity_features=features,
                       area=image.assignment.flatten(2).mean(dim=-1))  # (B, K): each group's share of the patches
        if "mask" in losses:
            if isinstance(self.mask_loss, OfficialMaskConsistencyLoss):
                self._embed_official_mask(image, batch, out, reuse)
            else:
                self._embed_mask(image, batch, out, reuse)
        return out

    def batch_losses(self, parts: dict) -> dict[str, torch.Tensor]:
        """The losses of the per-sample parts `embed` returned (of one batch, or of several
        joined): the projectors (their batch norm), then each loss over every row."""
        scale = self.scale()
        groups = parts["groups"]
        # the image embedding is the mean of the groups through the projector (the paper); each
        # group through the same projector is what segmentation compares with class prompts
        embedding = F.normalize(self.image_projector(groups.mean(dim=1)), dim=-1)  # (B, D)
        projected = self.image_projector(groups)  # (B, K, D)
        group_embeddings = F.normalize(projected, dim=-1)
        out: dict[str, torch.Tensor] = {}
        if "contrastive" in self.cfg.losses:
            text = F.normalize(self.text_projector(parts["caption"]), dim=-1)
            out["contrastive"] = contrastive_loss(embedding, text, scale)
        if "entity" in self.cfg.losses:
            answer = F.normalize(self.text_projector(parts["answer"]), dim=-1)
            predicted = self.entity_decoder.project(parts["decoded"])  # (B, D)
            out["entity"] = entity_completion_loss(predicted, answer, parts["has_entity"], scale)
        if "grounding" in self.cfg.losses:
            out["grounding"] = self._grounding(group_embeddings, parts)
        if "mask" in self.cfg.losses:
            out["mask"] = self._mask_consistency(projected, group_embeddings, parts)
        weights = self.cfg.loss_weights
        out["loss"] = sum(weights.get(name, 1.0) * value for name, value in out.items())
        return out

    def _grounding(self, group_embeddings: torch.Tensor, parts: dict) -> torch.Tensor:
        """Each image's masked entities against every entity of the batch (see the loss)."""
        unique = parts["entity_ids"]
        if unique.numel() == 0:
            if getattr(self.text_projector, "sync_stats", False):
                self.text_projector(parts["entity_features"])  # the other ranks' statistics wait for this rank's
            return group_embeddings.sum() * 0.0  # keeps the graph connected for DDP
        entities = F.normalize(self.text_projector(parts["entity_features"]), dim=-1)  # (U, D)
        targets = (parts["entity_keys"][:, :, None] == unique[None, None, :]).any(dim=1)  # (B, U)
        return grounding_loss(group_embeddings, parts["area"], entities, targets, self.grounding_scale,
                              self.grounding_bias, self.cfg.grounding_tau)

    def _mask_consistency(self, projected: torch.Tensor, group_embeddings: torch.Tensor, parts: dict) -> torch.Tensor:
        """The mask loss of the cached masks, with the groups' relevance to the shared entity
        (no gradient) read through the projectors."""
        has_partner = parts["has_partner"]
        if isinstance(self.mask_loss, OfficialMaskConsistencyLoss):
            with torch.no_grad():
                shared = self.text_projector(parts["shared"])  # (B, D), not normalised
                relevance = torch.einsum("bkd,bd->bk", projected, shared)
            return self.mask_loss(parts["student"], parts["teacher"], relevance, has_partner, parts["mask_size"])
        with torch.no_grad():
            if "partner_groups" in parts:  # the momentum encoder's (or the partner image's) groups
                partner_groups = F.normalize(self.image_projector(parts["partner_groups"]), dim=-1)
                if "partner_index" in parts:
                    partner_groups = partner_groups[parts["partner_index"]]
            else:  # the partner is a row of the batch, its groups the image encoder's own
                partner_groups = group_embeddings[parts["partner_index"]]
            shared = F.normalize(self.text_projector(parts["shared"]), dim=-1)  # (B, D)
            relevance = torch.einsum("bkd,bd->bk", group_embeddings, shared)
            partner_relevance = torch.einsum("bkd,bd->bk", partner_groups, shared)
        return self.mask_loss(parts["student"], parts["teacher"], relevance, has_partner, partner_relevance)

    def _embed_mask(self, image, batch: dict, out: dict, reuse: dict | None) -> None:
        """The ovseg mask loss's per-sample parts (see `mask_inputs`): the image's group masks on
        its partner's patches (with gradient), the partner's own masks and its groups before the
        projector (no gradient), the shared entity's sentence features (no gradient). With
        `reuse`, the parts without gradient are its own."""
        fine = _checked_mask_grid(self.cfg.mask_grid) == "assignment"
        teacher = None
        if "partner_index" in batch:
            rows = batch["partner_index"].clamp(min=0)  # rows without a partner are masked by has_partner
            out["partner_index"] = rows
            patches, low, pixels = (None if part is None else part[rows]
                                    for part in (image.inputs.patches, image.inputs.low, image.inputs.pixels))
            grid = image.inputs.grid
            if reuse is None:
                with torch.no_grad():
                    if self.momentum_encoder is not None:
                        teacher_out = self.momentum_encoder(batch["image"])
                        teacher = teacher_out.assignment[rows]
                        out["partner_groups"] = teacher_out.groups  # (B, K, C): row r's own, read at partner_index
                    else:
                        teacher = image.assignment[rows]
        elif "partner_image" in batch:
            partner = batch["partner_image"]
            with noise.derived("partner"):
                x = self.image_encoder.before_grouping(partner)  # patches (B, N, C)
            patches, grid, low, pixels = x.patches, x.grid, x.low, x.pixels
            if reuse is None:
                with torch.no_grad(), noise.derived("partner"):
                    teacher_encoder = self.image_encoder if self.momentum_encoder is None else self.momentum_encoder
                    teacher_out = teacher_encoder(partner)
                    teacher = teacher_out.assignment  # (B, K, h, w)
                    out["partner_groups"] = teacher_out.groups
        else:
            raise ValueError("the mask-consistency loss needs partner_image or partner_index in the batch")
        if teacher is not None:
            if not fine:  # both masks on the token grid: the teacher's averaged down to it
                teacher = F.adaptive_avg_pool2d(teacher, tuple(grid))
            out["teacher"] = teacher.flatten(2)  # (B, K, N')
        student = self.image_encoder.grouping.masks(image.anchors, patches, grid, low, pixels, fine)
        out["student"] = student  # (B, K, N')
        if reuse is None:
            with torch.no_grad(), noise.derived("shared"):
                out["shared"] = self.sentence(batch["shared_ids"], batch["shared_mask"])  # (B, Ct)
        else:
            out.update({key: reuse[key] for key in REUSABLE if key in reuse})
        out["has_partner"] = batch["has_partner"]

    def _embed_official_mask(self, image, batch: dict, out: dict, reuse: dict | None) -> None:
        """The official mask loss's per-sample parts (see `official_mask_inputs`); with `reuse`,
        the parts without gradient (the partner's keys among them) are its own."""
        teacher_encoder = self.image_encoder if self.momentum_encoder is None else self.momentum_encoder
        if reuse is not None:
            out.update({key: reuse[key] for key in REUSABLE if key in reuse})
            keys, (h, w), size = reuse["keys"], tuple(reuse["teacher"].shape[-2:]), reuse["mask_size"]
        else:
            with torch.no_grad():
                if "partner_index" in batch:
                    rows = batch["partner_index"].clamp(min=0)
                    teacher_out = image if self.momentum_encoder is None else teacher_encoder(batch["image"])
                    partner_anchors, partner_patches = teacher_out.anchors[rows], teacher_out.inputs.patches[rows]
                    size = tuple(batch["image"].shape[-2:])
                elif "partner_image" in batch:
                    with noise.derived("partner"):
                        teacher_out = teacher_encoder(batch["partner_image"])
                    partner_anchors, partner_patches = teacher_out.anchors, teacher_out.inputs.patches
                    size = tuple(batch["partner_image"].shape[-2:])
                else:
                    raise ValueError("the mask-consistency loss needs partner_image or partner_index in the batch")
                h, w = teacher_out.inputs.grid
                teacher_assign = teacher_encoder.grouping.assign
                keys = teacher_assign.project_k(teacher_encoder.grouping.norm_x(partner_patches))  # (B, N, C)
                teacher = teacher_assign.logits_of(teacher_assign.project_q(partner_anchors), keys)  # (B, K, N)
                with noise.derived("shared"):
                    out["shared"] = self.sentence(batch["shared_ids"], batch["shared_mask"])  # (B, Ct)
            out.update(keys=keys, teacher=teacher.view(teacher.shape[0], -1, h, w))
        student = self.image_encoder.grouping.assign.logits_of(
            self.image_encoder.grouping.assign.project_q(image.anchors), keys)
        b, k = student.shape[:2]
        out.update(student=student.view(b, k, h, w), has_partner=batch["has_partner"], mask_size=size)

    def official_mask_inputs(self, image: ImageEncoding, batch: dict) -> tuple:
        """What the official mask loss reads (the public code's `project_and_mask` and
        `compute_cross_loss`): the image's assignment queries against the momentum encoder's
        keys of the partner (student logits, gradient through the image's queries), the
        partner's own momentum logits (teacher), both (B, K, h, w) on the token grid; each of the
        image's groups through the projector against the shared entity's projected embedding
        (neither normalised); which rows have a partner; and the input size to upsample to.
        Without a momentum encoder (`momentum` 0) the image encoder itself, without gradient,
        plays its part."""
        parts: dict = {}
        self._embed_official_mask(image, batch, parts, None)
        with torch.no_grad():
            shared = self.text_projector(parts["shared"])  # (B, D)
            relevance = torch.einsum("bkd,bd->bk", image.group_projected, shared)
        return parts["student"], parts["teacher"], relevance, parts["has_partner"], parts["mask_size"]

    def mask_inputs(self, image: ImageEncoding, batch: dict, mask_grid: str | None = None) -> tuple[torch.Tensor, ...]:
        """What the mask-consistency loss reads: each image's group queries on its partner's
        patches (the student masks, with gradient), the partner's own masks (momentum encoder,
        or the image encoder when `momentum` is 0; no gradient), how related each group of the
        image and of the partner is to the shared entity, and which rows have a partner. The
        partner is an extra image (`partner_image`) or another row of the batch
        (`partner_index`), whose patches and masks the batch's forward has already made.
        `mask_grid`: the grid the masks are compared on (default: the config's)."""
        mask_grid = _checked_mask_grid(mask_grid or self.cfg.mask_grid)
        has_partner = batch["has_partner"]
        if "partner_index" in batch:
            rows = batch["partner_index"].clamp(min=0)  # rows without a partner are masked by has_partner
            patches, low, pixels = (None if part is None else part[rows]
                                    for part in (image.inputs.patches, image.inputs.low, image.inputs.pixels))
            grid = image.inputs.grid
            with torch.no_grad():
                if self.momentum_encoder is not None:
                    out = self.momentum_encoder(batch["image"])
                    teacher = out.assignment[rows]
                    partner_groups = F.normalize(self.image_projector(out.groups), dim=-1)[rows]
                else:
                    teacher = image.assignment[rows]
                    partner_groups = image.group_embeddings[rows]
        elif "partner_image" in batch:
            partner = batch["partner_image"]
            x = self.image_encoder.before_grouping(partner)  # patches (B, N, C)
            patches, grid, low, pixels = x.patches, x.grid, x.low, x.pixels
            with torch.no_grad():
                teacher_encoder = self.image_encoder if self.momentum_encoder is None else self.momentum_encoder
                out = teacher_encoder(partner)
                teacher = out.assignment  # (B, K, h, w)
                partner_groups = F.normalize(self.image_projector(out.groups), dim=-1)
        else:
            raise ValueError("the mask-consistency loss needs partner_image or partner_index in the batch")
        fine = mask_grid == "assignment"
        if not fine:  # both masks on the token grid: the teacher's averaged down to it
            teacher = F.adaptive_avg_pool2d(teacher, tuple(grid))
        teacher = teacher.flatten(2)  # (B, K, N')
        student = self.image_encoder.grouping.masks(image.anchors, patches, grid, low, pixels, fine)  # (B, K, N')
        with torch.no_grad():
            shared = self.embed_text(batch["shared_ids"], batch["shared_mask"])  # (B, D)
            relevance = torch.einsum("bkd,bd->bk", image.group_embeddings, shared)
            partner_relevance = torch.einsum("bkd,bd->bk", partner_groups, shared)
        return student, teacher, relevance, has_partner, partner_relevance


MASK_GRIDS = ("assignment", "tokens")


MASK_FORMS = ("official", "ovseg")


def _checked_mask_grid(name: str) -> str:
    if name not in MASK_GRIDS:
        raise ValueError(f"unknown mask grid {name!r}; choose from {', '.join(MASK_GRIDS)}")
    return name


def _first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of a 1-d tensor (sorted) and the index of each one's first occurrence."""
    unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first


def build_model(cfg: ModelConfig, tokenizer=None) -> OVSegmentor:
    """Build the model a config describes. The tokenizer is passed in (trained on the captions)
    or, for a pretrained text encoder, loaded with it."""
    from ovseg.training.model.image_encoder import load_dino
    from ovseg.training.model.text_encoder import load_text_tokenizer

    if tokenizer is None and cfg.text_pretrained:
        tokenizer = load_text_tokenizer(cfg)
    image_encoder = GroupingViT(cfg)
    if cfg.vision_init:
        load_dino(image_encoder, cfg.vision_init)
    text_encoder = TextEncoder(cfg, tokenizer)
    entity = mask = None
    if "entity" in cfg.losses:
        entity = build_entity_decoder(cfg, text_encoder.width)
    if "mask" in cfg.losses:
        if cfg.mask_form not in MASK_FORMS:
            raise ValueError(f"unknown model.mask_form {cfg.mask_form!r}; choose from {', '.join(MASK_FORMS)}")
        if cfg.mask_form == "official":
            if cfg.grouping != "learned":
                raise ValueError("model.mask_form=official needs the learned grouping (model.grouping=learned)")
            if cfg.extra_stage_depths:
                raise ValueError("model.mask_form=official needs one grouping stage (its masks and the ranked groups are the same K)")
            mask = OfficialMaskConsistencyLoss(cfg.mask_group_ratio, cfg.mask_relative_threshold)
        else:
            _checked_mask_grid(cfg.mask_grid)
            mask = MaskConsistencyLoss(cfg.mask_keep_groups, cfg.mask_target_threshold, cfg.mask_matching)
    model = OVSegmentor(
        cfg, image_encoder, text_encoder,
        image_projector=Projector(cfg.width, cfg.proj_hidden, cfg.embed_dim),
        text_projector=Projector(text_encoder.width, cfg.proj_hidden, cfg.embed_dim),
        tokenizer=tokenizer, entity_decoder=entity, mask_loss=mask,
    )
    return noise.install(model)  # per-sample noise inside noise.per_sample; as before outside it


def parameter_counts(model: OVSegmentor) -> dict[str, int]:
    """Parameters per part (trainable and frozen), for logs and docs."""
    parts = {
        "image encoder": model.image_encoder,
        "text encoder": model.text_encoder,
        "image projector": model.image_projector,
        "text projector": model.text_projector,
    }
    if model.entity_decoder is not None:
        parts["entity decoder"] = model.entity_decoder
    if model.momentum_encoder is not None:
        parts["momentum encoder (frozen)"] = model.momentum_encoder
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def parameter_table(model: OVSegmentor) -> str:
    """`parameter_counts` as a Markdown table (millions and exact counts)."""
    rows = ["| part | parameters | millions |", "|---|---:|---:|"]
    rows += [f"| {name} | {n:,} | {n / 1e6:.2f} |" for name, n in parameter_counts(model).items()]
    return "\n".join(rows)

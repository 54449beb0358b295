"""Zero-shot segmentation with a trained OVSegmentor.

Class names go through prompt templates and the text encoder; every output group of the image
encoder is scored against every class; each group keeps only its best class (GroupViT's and
OVSegmentor's inference); pixels take the class scores of their groups through the soft
patch-to-group assignment, upsampled to the image; a pixel whose best score stays below the
background threshold is background. Large images are processed with a sliding window.

A group's class scores are, by `scoring`:
- "softmax" (GroupViT's and OVSegmentor's): a softmax over the classes of the cosine
  similarities at the contrastive temperature; a group that shows none of the classes still
  puts its whole probability on them;
- "grounding" (ovseg's, for models trained with the grounding loss): the grounding head's
  presence probability, sigmoid(scale * cosine + bias), one per class, trained to say whether
  a group shows that entity at all, so background groups can score low for every class;
- "auto": grounding when the model trained with the grounding loss, else softmax.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PAPER_TEMPLATE = "a photo of a {}."
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
)


SCORINGS = ("auto", "softmax", "grounding")


def resolve_scoring(model, scoring: str = "auto") -> str:
    """"softmax" or "grounding" for `model` ("auto": grounding if it trained with that loss)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    if scoring != "auto":
        return scoring
    losses = getattr(getattr(model, "cfg", None), "losses", ())
    return "grounding" if "grounding" in losses else "softmax"


@dataclass(frozen=True)
class Protocol:
    """How images are sized and windowed at test time."""

    name: str
    short_side: int
    window: int
    stride: int


PROTOCOLS = {
    # OVSegmentor / GroupViT: short side 448, 448 windows with stride 224.
    "paper": Protocol("paper", 448, 448, 224),
    # The protocol of later training-free methods (and VOC20 / Context59 without background).
    "training-free": Protocol("training-free", 336, 224, 112),
}


def synthetic_protocol(image_size: int) -> Protocol:
    """The synthetic world in one window at the model's training size (its 64 px images are
    resized to it and the prediction back to the labels)."""
    return Protocol("synthetic", image_size, image_size, image_size // 2)


class ZeroShotSegmenter:
    """Segments images into `class_names` (foreground classes) plus an optional background."""

    def __init__(self, model, class_names: list[str], *, templates=(PAPER_TEMPLATE,),
                 with_background: bool = True, bg_threshold: float = 0.5,
                 protocol: Protocol = PROTOCOLS["paper"], top_k: int | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 8, bf16: bool = True,
                 scoring: str = "auto"):
        self.model = model.eval()
        self.scoring = resolve_scoring(model, scoring)
        self.class_names = list(class_names)
        self.templates = tuple(templates)
        self.with_background = with_background
        self.bg_threshold = bg_threshold
        self.protocol = protocol
        self.top_k = top_k
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.bf16 = bf16  # bf16 autocast of the model on CUDA
        self.patch_size = int(getattr(model, "patch_size", 16))
        self.mean = torch.tensor(getattr(model, "image_mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(model, "image_std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        self._class_cache: dict[tuple, torch.Tensor] = {}

    # -- text side ---------------------------------------------------------------------------
    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """(C, D) normalised class embeddings, the mean over templates; cached per vocabulary."""
        key = (tuple(self.class_names), self.templates)
        if key not in self._class_cache:
            prompts = [t.format(name) for name in self.class_names for t in self.templates]
            with self._autocast():
                emb = self.model.encode_text(prompts).float()  # (C*T, D)
            emb = F.normalize(emb, dim=-1).view(len(self.class_names), len(self.templates), -1).mean(1)
            self._class_cache[key] = F.normalize(emb, dim=-1)
        return self._class_cache[key]

    def _autocast(self):
        if self.device.type == "cuda" and self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            return 100.0
        value = scale.exp().item() if isinstance(scale, torch.Tensor) else float(np.exp(scale))
        return min(value, 100.0)

    def _group_probabilities(self, cosine: torch.Tensor) -> torch.Tensor:
        """(N, K, C) cosine similarities of groups and classes -> the groups' class scores."""
        if self.scoring == "grounding":
            scale, bias = self.model.grounding_scale.float(), self.model.grounding_bias.float()
            return torch.sigmoid(scale * cosine + bias)
        return (self._logit_scale() * cosine).softmax(dim=-1)

    # -- image side --------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> normalised (1, 3, h, w) with the short side at the protocol's."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(self.device)
        x = x.permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        scale = self.protocol.short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - self.mean.to(self.device)) / self.std.to(self.device)

    @torch.no_grad()
    def _window_scores(self, crops: torch.Tensor, classes: torch.Tensor,
                       with_groups: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-pixel class scores (N, C, h, w) and, if asked, group maps (N, K, h, w) for crops
        whose sides are multiples of the patch size."""
        with self._autocast():
            out = self.model.encode_image(crops.to(self.device))
        groups = F.normalize(out.group_embeddings.float(), dim=-1)  # (N, K, D)
        probs = self._group_probabilities(groups @ classes.T)  # (N, K, C)
        if self.top_k is not None and self.top_k < probs.shape[-1]:
            image_sim = F.normalize(out.embedding.float(), dim=-1) @ classes.T  # (N, C)
            keep = torch.zeros_like(image_sim, dtype=torch.bool)
            keep.scatter_(1, image_sim.topk(self.top_k, dim=-1).indices, True)
            probs = probs * keep[:, None, :]
        # each group keeps only its best class, with that class's probability
        best = probs.max(dim=-1, keepdim=True)
        group_scores = torch.zeros_like(probs).scatter_(-1, best.indices, best.values)  # (N, K, C)
        assignment = out.assignment.float()  # (N, K, h', w')
        assignment = F.interpolate(assignment, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        scores = torch.einsum("nkhw,nkc->nchw", assignment, group_scores)
        return scores, (assignment if with_groups else None)

    def _pad_to_patch(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.patch_size, (-w) % self.patch_size
        return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), h, w

    def _windows(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        win, stride = self.protocol.window, self.protocol.stride
        wh, ww = min(win, h), min(win, w)
        rows = max(h - wh + stride - 1, 0) // stride + 1
        cols = max(w - ww + stride - 1, 0) // stride + 1
        boxes = []
        for r in range(rows):
            for c in range(cols):
                y0, x0 = min(r * stride, h - wh), min(c * stride, w - ww)
                boxes.append((y0, x0, y0 + wh, x0 + ww))
        return boxes

    @torch.no_grad()
    def scores(self, image: np.ndarray, slide: bool = True,
               with_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class scores (C, H, W) at the image's own size, on the segmenter's device, and, if
        asked, the soft group map (K, H, W) of the whole image on the CPU (for pictures and
        diagnostics; None otherwise)."""
        return self.scores_batch([image], slide=slide, with_groups=with_groups)[0]

    @torch.no_grad()
    def scores_batch(self, images: list[np.ndarray], slide: bool = True,
                     with_groups: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """`scores` of several images at once: the windows of all of them go through the model
        in batches of `batch_size` crops of one size, so small images (one window each) are
        batched across images and large ones across their windows. Resizing, window averaging
        and the scores stay on the segmenter's device (only group maps come back to the CPU)."""
        classes = self.class_embeddings().to(self.device)
        prepared = [self._prepare(image) for image in images]
        by_size: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
        n_windows = [0] * len(images)
        for i, x in enumerate(prepared):
            h, w = x.shape[-2:]
            for box in (self._windows(h, w) if slide else [(0, 0, h, w)]):
                by_size.setdefault((box[2] - box[0], box[3] - box[1]), []).append((i, box))
                n_windows[i] += 1
        totals = [torch.zeros(len(self.class_names), *x.shape[-2:], device=self.device) for x in prepared]
        counts = [torch.zeros(1, *x.shape[-2:], device=self.device) for x in prepared]
        groups: list[torch.Tensor | None] = [None] * len(images)
        for jobs in by_size.values():  # crops of one size go through the model together
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start:start + self.batch_size]
                crops = torch.cat([prepared[i][..., y0:y1, x0:x1] for i, (y0, x0, y1, x1) in chunk])
                padded, ch, cw = self._pad_to_patch(crops)
                s, g = self._window_scores(padded, classes, with_groups)
                for j, (i, (y0, x0, y1, x1)) in enumerate(chunk):
                    totals[i][:, y0:y1, x0:x1] += s[j, :, :ch, :cw]
                    counts[i][:, y0:y1, x0:x1] += 1
                    if with_groups and n_windows[i] == 1:
                        groups[i] = g[j, :, :ch, :cw]
        results = []
        for i, image in enumerate(images):
            H, W = image.shape[:2]
            total = totals[i] / counts[i].clamp(min=1)
            total = F.interpolate(total[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            if not with_groups:
                results.append((total, None))
                continue
            group_map = groups[i]
            if group_map is None:  # several windows: the group map comes from one whole-image pass
                padded, ch, cw = self._pad_to_patch(prepared[i])
                _, g = self._window_scores(padded, classes, True)
                group_map = g[0, :, :ch, :cw]
            group_map = F.interpolate(group_map[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            results.append((total, group_map.cpu()))
        return results

    def predict_from_scores(self, scores: torch.Tensor, bg_threshold: float | None = None) -> np.ndarray:
        """Label map (H, W): with a background class, 0 is background and class i is i + 1."""
        best, label = scores.max(dim=0)
        if self.with_background:
            threshold = self.bg_threshold if bg_threshold is None else bg_threshold
            label = torch.where(best < threshold, 0, label + 1)
        return label.cpu().numpy().astype(np.int64)

    def predict(self, image: np.ndarray) -> np.ndarray:
        scores, _ = self.scores(image)
        return self.predict_from_scores(scores)

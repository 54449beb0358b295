"""Zero-shot segmentation with a trained OVSegmentor.

Class names go through prompt templates and the text encoder; every output group of the image
encoder is scored against every class. Large images are processed with a sliding window whose
per-window outputs are averaged where windows overlap (mmsegmentation's slide inference). How a
window's pixels get their classes is the protocol's labelling rule:

- "official" (GroupViT's `GroupViTSegInference.encode_decode`, which OVSegmentor uses
  unchanged): each pixel belongs to one group, the argmax of the group map upsampled to the
  window; a group's class scores are the softmax over the classes of its similarities times the
  same softmax restricted to the image's top-5 classes (by the image embedding), so a class
  outside the image's top 5 scores 0; a pixel takes its group's scores. With a background class,
  a pixel votes background when its best score is below min(threshold, the window's best
  group-class score), so the best group of a window always keeps its class. Background votes and
  class scores are averaged over windows and the label is their argmax.
- "soft" (ovseg's earlier rule): each group keeps only its best class; pixels take the class
  scores of their groups through the soft assignment (a sum over groups); `top_k` optionally
  keeps the image's k best classes; the background threshold is applied once, after the windows
  are averaged.

A group's class scores under the soft rule are, by `scoring`:
- "softmax" (GroupViT's and OVSegmentor's): a softmax over the classes of the cosine
  similarities at the contrastive temperature; a group that shows none of the classes still
  puts its whole probability on them;
- "grounding" (ovseg's, for models trained with the grounding loss): the grounding head's
  presence probability, sigmoid(scale * cosine + bias), one per class, trained to say whether
  a group shows that entity at all, so background groups can score low for every class;
- "auto": grounding when the model trained with the grounding loss, else softmax.
The official rule is defined on softmax scores only ("auto" means softmax there).

The model is used through its public API only: `encode_image(images)` with `.embedding` (B, D),
`.group_embeddings` (B, K, D) and `.assignment` (B, K, h, w), `encode_text(texts)` (N, D) and
`scale()` (the contrastive logit scale).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.curation.contract import IMAGENET_MEAN, IMAGENET_STD

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


RULES = ("official", "soft")
OFFICIAL_TOP_K = 5  # the official rule keeps the image's 5 best classes
MAX_LOGIT_SCALE = 100.0  # both the official inference and ovseg clamp the logit scale here


@dataclass(frozen=True)
class Protocol:
    """How images are sized and windowed at test time, and how pixels get their labels."""

    name: str
    short_side: int
    window: int
    stride: int
    rule: str = "soft"  # "official" or "soft" (see the module docstring)
    prompts: str = "ovseg"  # "official": the official code's class words; "ovseg": ovseg's renames
    long_side: int | None = None  # cap on the long side after resizing (mmseg's Resize to (2048, 448))

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown labelling rule {self.rule!r}; choose from {', '.join(RULES)}")


PROTOCOLS = {
    # OVSegmentor / GroupViT as their code evaluates: short side 448 (long side at most 2048),
    # 448 windows with stride 224, the official labelling rule and class words.
    "paper": Protocol("paper", 448, 448, 224, rule="official", prompts="official", long_side=2048),
    # The same windows with ovseg's earlier soft rule and its prompt renames.
    "soft": Protocol("soft", 448, 448, 224),
    # The protocol of later training-free methods (and VOC20 / Context59 without background).
    "training-free": Protocol("training-free", 336, 224, 112),
}


def synthetic_protocol(image_size: int) -> Protocol:
    """The synthetic world in one window at the model's training size (its 64 px images are
    resized to it and the prediction back to the labels)."""
    return Protocol("synthetic", image_size, image_size, image_size // 2)


def _argmax_groups(assignment: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) -> (N, h, w) index of the largest group, the first one on ties (as argmax);
    a running maximum over the K groups, much faster than argmax over a strided dimension."""
    best, owner = assignment[:, 0], torch.zeros(assignment[:, 0].shape, dtype=torch.long, device=assignment.device)
    for k in range(1, assignment.shape[1]):
        better = assignment[:, k] > best
        owner = torch.where(better, k, owner)
        best = torch.where(better, assignment[:, k], best)
    return owner


class ZeroShotSegmenter:
    """Segments images into `class_names` (foreground classes) plus an optional background."""

    def __init__(self, model, class_names: list[str], *, templates=(PAPER_TEMPLATE,),
                 with_background: bool = True, bg_threshold: float = 0.5,
                 protocol: Protocol = PROTOCOLS["paper"], top_k: int | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 8, bf16: bool = True,
                 scoring: str = "auto"):
        self.model = model.eval()
        self.protocol = protocol
        self.official = protocol.rule == "official"
        if self.official and scoring == "auto":
            scoring = "softmax"
        self.scoring = resolve_scoring(model, scoring)
        if self.official and self.scoring != "softmax":
            raise ValueError(f"the {protocol.name} protocol's official rule scores groups by softmax; "
                             f"{self.scoring} scoring needs the soft rule (--protocol soft)")
        self.class_names = list(class_names)
        self.templates = tuple(templates)
        self.with_background = with_background
        self.bg_threshold = bg_threshold
        self.top_k = top_k
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.bf16 = bf16  # bf16 autocast of the model on CUDA
        self.patch_size = int(getattr(model, "patch_size", 16))
        self.mean = torch.tensor(getattr(model, "image_mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(model, "image_std", IMAGENET_STD)).view(1, 3, 1, 1)
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
        """The model's contrastive logit scale (`scale()`), at most 100 as in the official code."""
        if callable(getattr(self.model, "scale", None)):
            value = float(self.model.scale())
        else:  # models without `scale()`: the raw log-scale parameter, if any
            scale = getattr(self.model, "logit_scale", None)
            if scale is None:
                return MAX_LOGIT_SCALE
            value = scale.exp().item() if isinstance(scale, torch.Tensor) else float(np.exp(scale))
        return min(value, MAX_LOGIT_SCALE)

    def _group_probabilities(self, cosine: torch.Tensor) -> torch.Tensor:
        """(N, K, C) cosine similarities of groups and classes -> the groups' class scores."""
        if self.scoring == "grounding":
            scale, bias = self.model.grounding_scale.float(), self.model.grounding_bias.float()
            return torch.sigmoid(scale * cosine + bias)
        return (self._logit_scale() * cosine).softmax(dim=-1)

    # -- image side --------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> normalised (1, 3, h, w) with the short side at the protocol's (and
        the long side at most its `long_side`, mmcv's keep-ratio rescale)."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(self.device)
        x = x.permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        scale = self.protocol.short_side / min(h, w)
        if self.protocol.long_side is not None:
            scale = min(scale, self.protocol.long_side / max(h, w))
        size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - self.mean.to(self.device)) / self.std.to(self.device)

    @torch.no_grad()
    def _window_outputs(self, crops: torch.Tensor, classes: torch.Tensor, thresholds: tuple[float, ...],
                        with_groups: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """For crops (N, 3, h, w) whose sides are multiples of the patch size: class scores
        (N, C, h, w), background votes (N, T, h, w) for each of `thresholds` (official rule with
        a background class; None otherwise) and, if asked, the soft group map (N, K, h, w)."""
        with self._autocast():
            out = self.model.encode_image(crops.to(self.device))
        groups = F.normalize(out.group_embeddings.float(), dim=-1)  # (N, K, D)
        image = F.normalize(out.embedding.float(), dim=-1)  # (N, D)
        assignment = F.interpolate(out.assignment.float(), size=crops.shape[-2:], mode="bilinear",
                                   align_corners=False)  # (N, K, h, w)
        if self.official:
            scores, votes = self._official_labels(groups @ classes.T, image @ classes.T, assignment, thresholds)
        else:
            scores, votes = self._soft_labels(groups @ classes.T, image @ classes.T, assignment), None
        return scores, votes, (assignment if with_groups else None)

    def _official_labels(self, cosine: torch.Tensor, image_cosine: torch.Tensor, assignment: torch.Tensor,
                         thresholds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The official rule on one batch of windows: group-class cosines (N, K, C), image-class
        cosines (N, C), group maps (N, K, h, w) -> class scores (N, C, h, w), background votes
        (N, T, h, w) or None."""
        logits = self._logit_scale() * cosine  # (N, K, C)
        n_classes = logits.shape[-1]
        k = min(self.top_k or OFFICIAL_TOP_K, n_classes)
        image_probs = (self._logit_scale() * image_cosine).softmax(dim=-1)  # (N, C)
        keep = torch.zeros_like(image_probs, dtype=torch.bool)
        keep.scatter_(1, image_probs.topk(k, dim=-1).indices, True)
        in_top = logits.masked_fill(~keep[:, None, :], float("-inf")).softmax(dim=-1)  # (N, K, C)
        probs = in_top * logits.softmax(dim=-1)  # (N, K, C)
        n, _, h, w = assignment.shape
        owner = _argmax_groups(assignment).view(n, 1, h * w)  # (N, 1, h*w): one group per pixel
        by_class = probs.transpose(1, 2)  # (N, C, K)
        scores = by_class.gather(2, owner.expand(-1, n_classes, -1)).view(n, n_classes, h, w)
        if not self.with_background:
            return scores, None
        best = probs.amax(dim=-1).gather(1, owner[:, 0]).view(n, h, w)  # (N, h, w): each pixel's best score
        window_best = probs.flatten(1).amax(dim=1)  # (N,): the best group-class score of each window
        votes = [(best < window_best.clamp(max=t)[:, None, None]).float() for t in thresholds]
        return scores, torch.stack(votes, dim=1)  # (N, T, h, w)

    def _soft_labels(self, cosine: torch.Tensor, image_cosine: torch.Tensor,
                     assignment: torch.Tensor) -> torch.Tensor:
        """ovseg's soft rule: (N, K, C), (N, C), (N, K, h, w) -> class scores (N, C, h, w)."""
        probs = self._group_probabilities(cosine)  # (N, K, C)
        if self.top_k is not None and self.top_k < probs.shape[-1]:
            keep = torch.zeros_like(image_cosine, dtype=torch.bool)
            keep.scatter_(1, image_cosine.topk(self.top_k, dim=-1).indices, True)
            probs = probs * keep[:, None, :]
        # each group keeps only its best class, with that class's probability
        best = probs.max(dim=-1, keepdim=True)
        group_scores = torch.zeros_like(probs).scatter_(-1, best.indices, best.values)  # (N, K, C)
        return torch.einsum("nkhw,nkc->nchw", assignment, group_scores)

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
        """Label scores (L, H, W) at the image's own size, on the segmenter's device, and, if
        asked, the soft group map (K, H, W) of the whole image on the CPU (for pictures and
        diagnostics; None otherwise). L is the number of classes C, except under the official
        rule with a background class: then L = 1 + C and channel 0 is the share of windows that
        voted background at `bg_threshold`. `predict_from_scores` turns them into labels."""
        return self.scores_batch([image], slide=slide, with_groups=with_groups)[0]

    @torch.no_grad()
    def scores_batch(self, images: list[np.ndarray], slide: bool = True,
                     with_groups: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """`scores` of several images at once (see `_accumulate`)."""
        results = []
        for scores, votes, groups in self._accumulate(images, slide, with_groups, (self.bg_threshold,)):
            if votes is not None:
                scores = torch.cat([votes, scores])  # (1 + C, H, W)
            results.append((scores, groups))
        return results

    @torch.no_grad()
    def labels_for_thresholds(self, images: list[np.ndarray], thresholds) -> list[dict[float, np.ndarray]]:
        """Label maps of each image at each background threshold, from one pass of the model
        (threshold tuning). Under the official rule the threshold acts inside every window."""
        thresholds = tuple(float(t) for t in thresholds)
        results = []
        for scores, votes, _ in self._accumulate(images, True, False, thresholds):
            if votes is None:
                results.append({t: self.predict_from_scores(scores, t) for t in thresholds})
            else:
                results.append({t: self._official_argmax(torch.cat([votes[i:i + 1], scores]))
                                for i, t in enumerate(thresholds)})
        return results

    def _accumulate(self, images: list[np.ndarray], slide: bool, with_groups: bool,
                    thresholds: tuple[float, ...]):
        """Per image: class scores (C, H, W), background votes (T, H, W) or None, and the group
        map (K, H, W) on the CPU or None. The windows of all images go through the model in
        batches of `batch_size` crops of one size, so small images (one window each) are batched
        across images and large ones across their windows. Resizing, window averaging and the
        scores stay on the segmenter's device (only group maps come back to the CPU)."""
        classes = self.class_embeddings().to(self.device)
        prepared = [self._prepare(image) for image in images]
        by_size: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
        n_windows = [0] * len(images)
        for i, x in enumerate(prepared):
            h, w = x.shape[-2:]
            for box in (self._windows(h, w) if slide else [(0, 0, h, w)]):
                by_size.setdefault((box[2] - box[0], box[3] - box[1]), []).append((i, box))
                n_windows[i] += 1
        with_votes = self.official and self.with_background
        n_votes = len(thresholds) if with_votes else 0
        totals = [torch.zeros(len(self.class_names) + n_votes, *x.shape[-2:], device=self.device) for x in prepared]
        counts = [torch.zeros(1, *x.shape[-2:], device=self.device) for x in prepared]
        groups: list[torch.Tensor | None] = [None] * len(images)
        for jobs in by_size.values():  # crops of one size go through the model together
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start:start + self.batch_size]
                crops = torch.cat([prepared[i][..., y0:y1, x0:x1] for i, (y0, x0, y1, x1) in chunk])
                padded, ch, cw = self._pad_to_patch(crops)
                s, v, g = self._window_outputs(padded, classes, thresholds, with_groups)
                for j, (i, (y0, x0, y1, x1)) in enumerate(chunk):
                    totals[i][n_votes:, y0:y1, x0:x1] += s[j, :, :ch, :cw]
                    if v is not None:
                        totals[i][:n_votes, y0:y1, x0:x1] += v[j, :, :ch, :cw]
                    counts[i][:, y0:y1, x0:x1] += 1
                    if with_groups and n_windows[i] == 1:
                        groups[i] = g[j, :, :ch, :cw]
        for i, image in enumerate(images):
            H, W = image.shape[:2]
            total = totals[i] / counts[i].clamp(min=1)
            total = F.interpolate(total[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            votes, scores = (total[:n_votes], total[n_votes:]) if with_votes else (None, total)
            group_map = None
            if with_groups:
                group_map = groups[i]
                if group_map is None:  # several windows: the group map comes from one whole-image pass
                    padded, ch, cw = self._pad_to_patch(prepared[i])
                    _, _, g = self._window_outputs(padded, classes, thresholds[:1], True)
                    group_map = g[0, :, :ch, :cw]
                group_map = F.interpolate(group_map[None], size=(H, W), mode="bilinear",
                                          align_corners=False)[0].cpu()
            yield scores, votes, group_map

    def _official_argmax(self, scores: torch.Tensor) -> np.ndarray:
        # channel 0 is background when there is one, so channel index = label; ties go to the
        # lower channel, as torch's (and mmseg's) argmax does
        return scores.argmax(dim=0).cpu().numpy().astype(np.int64)

    def predict_from_scores(self, scores: torch.Tensor, bg_threshold: float | None = None) -> np.ndarray:
        """Label map (H, W): with a background class, 0 is background and class i is i + 1.
        Under the official rule the threshold already acted per window (`scores` holds the
        background votes); another threshold needs `labels_for_thresholds`."""
        if self.official:
            if bg_threshold is not None and self.with_background and bg_threshold != self.bg_threshold:
                raise ValueError("under the official rule the background threshold acts per window: "
                                 "use labels_for_thresholds to label at another threshold")
            return self._official_argmax(scores)
        best, label = scores.max(dim=0)
        if self.with_background:
            threshold = self.bg_threshold if bg_threshold is None else bg_threshold
            label = torch.where(best < threshold, 0, label + 1)
        return label.cpu().numpy().astype(np.int64)

    def predict(self, image: np.ndarray) -> np.ndarray:
        scores, _ = self.scores(image)
        return self.predict_from_scores(scores)

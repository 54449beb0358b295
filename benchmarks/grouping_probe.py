"""A supervised probe of the grouping: does a grouping block keep several groups per image when
it is trained with the true labels?

The encoder (a small `GroupingViT`) sees the synthetic world's images; each image's groups are
scored against learnt class vectors, pooled over the groups by the grounding loss's soft maximum
(weighted by each group's share of the patches), and trained with multi-label binary
cross-entropy against the shapes the image holds. No text, no captions: if the assignment folds
every patch into one group even here, no caption loss will unfold it. Reported on the world's
val split: distinct arg-max groups per image, and the group-majority mIoU (every group named by
the majority true label of its pixels: what the grouping alone allows). `style` picks the world
(the textured one, where colour does not draw the masks, asks whether the grouping can learn
them). With a `preset` (and overrides), the encoder is that preset's own image encoder, so that
the pixel target says what the preset's architecture reaches in a step budget when it is told
every pixel's class: a supervised reference for the caption-trained runs of `ovseg bench
synthetic` at the same steps and batch, scored on the same test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.benchmarks.measure import Measure
from ovseg.benchmarks.results import Blocks, Section
from ovseg.curation.contract import IMAGENET_MEAN, IMAGENET_STD
from ovseg.curation.synthetic import WorldConfig, classes as world_classes, label_map, make_sample
from ovseg.evaluation.metrics import ConfusionMatrix, group_majority_labels
from ovseg.training.losses.grounding import pooled_similarity
from ovseg.training.model.config import ModelConfig
from ovseg.training.model.image_encoder import GroupingViT

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@dataclasses.dataclass
class ProbeConfig:
    grouping: str = "learned"      # "learned" (GroupViT's assignment) or "cluster" (ovseg's k-means)
    hard_assignment: bool = True   # Gumbel straight-through one-hot in training (the official), or the softmax
    depth_before: int = 2
    depth_after: int = 2
    width: int = 64
    heads: int = 4
    num_group_tokens: int = 16
    num_groups: int = 8
    input_size: int = 32
    patch_size: int = 4
    n_train: int = 2000
    n_val: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    steps: int = 600
    seed: int = 0
    tau: float = 0.1               # temperature of the soft maximum over groups
    style: str = "standard"        # the synthetic world's style (curation.synthetic.STYLES)
    eval_every: int = 0            # also score val every this many steps (0: only before and after)
    # what the probe is trained on: "image" (which shapes the image holds, through the groups'
    # soft maximum: the weak label a caption gives) or "pixels" (every pixel's class through its
    # group, straight through the hard assignment: whether the grouping can draw the masks at all)
    target: str = "image"
    # the image encoder of this preset (with `overrides`, key.sub=value) instead of the sizes
    # above (width, heads, depths, groups, input and patch size all come from it)
    preset: str = ""
    overrides: tuple[str, ...] = ()
    n_test: int = 0                # pixel target: also score the probe's own labels on this many test images


def model_config(cfg: ProbeConfig) -> ModelConfig:
    """The encoder's settings: the preset's model (with the overrides), or the probe's own sizes."""
    if cfg.preset:
        from ovseg.training.config import resolve

        return resolve(cfg.preset, overrides=list(cfg.overrides)).model
    return ModelConfig(image_size=cfg.input_size, patch_size=cfg.patch_size, patch_embed="conv",
                       width=cfg.width, heads=cfg.heads, depth_before=cfg.depth_before,
                       depth_after=cfg.depth_after, num_group_tokens=cfg.num_group_tokens,
                       num_groups=cfg.num_groups, grouping=cfg.grouping, hard_assignment=cfg.hard_assignment)


def _world(cfg: ProbeConfig, split: str, n: int, world: WorldConfig, size: int | None = None):
    """(images (N, 3, s, s) normalised (s: `size`, else the probe's input size), multi-hot
    labels (N, C), label maps at world size)."""
    names = world_classes(world)
    images, hot, maps = [], np.zeros((n, len(names) - 1), np.float32), []
    for i in range(n):
        scene, image, depth = make_sample(world, split, i)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        label = label_map(scene, depth, names)
        maps.append(label)
        for obj in scene.objects:
            hot[i, names.index(obj.shape) - 1] = 1.0
    x = torch.stack(images).float() / 255
    x = F.interpolate(x, size=(size or cfg.input_size,) * 2, mode="bilinear", align_corners=False)
    return (x - MEAN) / STD, torch.from_numpy(hot), maps


class Probe(nn.Module):
    def __init__(self, cfg: ProbeConfig, n_classes: int):
        super().__init__()
        model = model_config(cfg)
        self.encoder = GroupingViT(model)
        self.classes = nn.Parameter(torch.randn(n_classes, model.width) * 0.02)
        # the pixel target's classes, background first
        self.pixel_classes = nn.Parameter(torch.randn(n_classes + 1, model.width) * 0.02) if cfg.target == "pixels" else None
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-3.0))
        self.tau = cfg.tau

    def forward(self, images: torch.Tensor):
        out = self.encoder(images)
        area = out.assignment.flatten(2).mean(-1)  # (B, K): each group's share of the patches
        pooled = pooled_similarity(F.normalize(out.groups, dim=-1), area, F.normalize(self.classes, dim=-1), self.tau)
        return self.scale * pooled + self.bias, out.assignment  # (B, C), (B, K, h, w)

    def pixel_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C + 1, h, w): each assignment cell's class logits, those of the group it belongs to."""
        return self._cell_logits(self.encoder(images))

    def _cell_logits(self, out) -> torch.Tensor:
        group = self.scale * F.normalize(out.groups, dim=-1) @ F.normalize(self.pixel_classes, dim=-1).T  # (B, K, C + 1)
        return torch.einsum("bkhw,bkc->bchw", out.assignment, group)

    def scored(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What scoring reads, from one pass of the encoder: the assignment (B, K, h, w) and, with
        the pixel target, the cells' class logits (B, C + 1, h, w) (else None)."""
        out = self.encoder(images)
        return out.assignment, self._cell_logits(out) if self.pixel_classes is not None else None


@torch.no_grad()
def grouping_scores(probe: Probe, images: torch.Tensor, maps: list[np.ndarray], n_classes: int) -> dict[str, float]:
    """Distinct arg-max groups per image and the group-majority mIoU; with the pixel target also
    `miou`, that of the probe's own labels (each cell the class of its group)."""
    probe.eval()
    matrix, own = ConfusionMatrix(n_classes), ConfusionMatrix(n_classes)
    groups = 0
    for start in range(0, len(images), 64):
        batch = images[start:start + 64]
        assignment, logits = probe.scored(batch)
        labels = None if logits is None else logits.argmax(1, keepdim=True)
        for j, label in enumerate(maps[start:start + 64]):
            up = F.interpolate(assignment[j:j + 1].float(), size=label.shape, mode="nearest")[0].numpy()
            groups += len(np.unique(up.argmax(0)))
            matrix.update(label, group_majority_labels(up, label, n_classes))
            if labels is not None:
                own.update(label, F.interpolate(labels[j:j + 1].float(), size=label.shape, mode="nearest")[0, 0].long().numpy())
    probe.train()
    scores = {"groups_per_image": groups / len(maps), "group_majority_miou": 100 * matrix.compute().miou}
    if probe.pixel_classes is not None:
        scores["miou"] = 100 * own.compute().miou
    return scores


def run_probe(cfg: ProbeConfig, progress: bool = False) -> dict[str, float]:
    """Train the probe for `cfg.steps` steps; scores on val before and after (and every
    `cfg.eval_every` steps, in `curve`), and the training time taken."""
    torch.manual_seed(cfg.seed)
    world = WorldConfig(style=cfg.style)
    n_classes = len(world_classes(world))
    if cfg.target not in ("image", "pixels"):
        raise ValueError(f"target must be image or pixels, not {cfg.target!r}")
    size = model_config(cfg).image_size
    x, y, maps = _world(cfg, "train", cfg.n_train, world, size)
    labels = torch.from_numpy(np.stack(maps))  # (N, H, W) uint8, 255 on borders
    vx, _, vmaps = _world(cfg, "val", cfg.n_val, world, size)
    probe = Probe(cfg, n_classes - 1)
    before = grouping_scores(probe, vx, vmaps, n_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(cfg.seed)
    curve, scoring_s = [], 0.0
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, desc=f"probe {_recipe(cfg) if cfg.preset else cfg.grouping} seed {cfg.seed}",
               unit="step", disable=not progress, leave=False)
    with bar, Measure() as training:
        for step in range(cfg.steps):
            index = torch.randint(0, len(x), (cfg.batch_size,), generator=generator)
            if cfg.target == "pixels":
                target = labels[index].long()
                logits = F.interpolate(probe.pixel_logits(x[index]), size=target.shape[-2:], mode="nearest")
                loss = F.cross_entropy(logits, target, ignore_index=255)
            else:
                logits, _ = probe(x[index])
                loss = F.binary_cross_entropy_with_logits(logits, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if progress and (step + 1) % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                with Measure() as scoring:
                    curve.append({"step": step + 1, **grouping_scores(probe, vx, vmaps, n_classes)})
                scoring_s += scoring.seconds  # scoring is not training time
                if progress:
                    bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in curve[-1].items() if k != "step"))
    minutes = (training.seconds - scoring_s) / 60
    after = grouping_scores(probe, vx, vmaps, n_classes)
    test = {}
    if cfg.n_test and cfg.target == "pixels":
        tx, _, tmaps = _world(cfg, "test", cfg.n_test, world, size)
        test = {f"test_{k}": v for k, v in grouping_scores(probe, tx, tmaps, n_classes).items()}
    return {"steps": cfg.steps, "minutes": minutes, "loss": float(loss.item()),
            **{f"init_{k}": v for k, v in before.items()}, **after, **test,
            "curve": [*curve, {"step": cfg.steps, **after}]}


def _kind(cfg: ProbeConfig) -> str:
    return "hard (Gumbel)" if cfg.hard_assignment else "soft"


def probe_table(section: Blocks, rows: list[tuple[str, ProbeConfig, dict[str, float]]]) -> Blocks:
    """Add the table of probe runs to `section`: one row per run."""
    return section.table(
        ["world", "grouping", "assignment", "target", "blocks before + after", ("seed", "right", "d"),
         ("steps (batch)", "right"), ("groups per val image (init)", "right"), ("group-majority mIoU (init)", "right"),
         ("minutes", "right", ".1f")],
        [[cfg.style, name, _kind(cfg), cfg.target, f"{cfg.depth_before} + {cfg.depth_after}", cfg.seed,
          f"{r['steps']} ({cfg.batch_size})", f"{r['groups_per_image']:.2f} ({r['init_groups_per_image']:.2f})",
          f"{r['group_majority_miou']:.1f} ({r['init_group_majority_miou']:.1f})", r["minutes"]]
         for name, cfg, r in rows])


def curve_table(section: Blocks, rows: list[tuple[str, ProbeConfig, dict[str, float]]]) -> Blocks:
    """Add each run's val scores over training (`ProbeConfig.eval_every`, step 0 the init) to `section`."""
    table = []
    for name, cfg, r in rows:
        init = {"step": 0, "groups_per_image": r["init_groups_per_image"],
                "group_majority_miou": r["init_group_majority_miou"]}
        table += [[cfg.style, name, _kind(cfg), cfg.target, f"{cfg.depth_before} + {cfg.depth_after}", cfg.seed,
                   point["step"], point["groups_per_image"], point["group_majority_miou"]]
                  for point in [init, *r.get("curve", ())]]
    return section.table(["world", "grouping", "assignment", "target", "blocks", ("seed", "right", "d"),
                          ("step", "right", "d"), ("groups per val image", "right", ".2f"),
                          ("group-majority mIoU", "right", ".1f")], table)


def _recipe(cfg: ProbeConfig) -> str:
    return f"`{cfg.preset}`" + "".join(f", `{o}`" for o in cfg.overrides)


def reference_table(section: Blocks, rows: list[tuple[str, ProbeConfig, dict[str, float]]]) -> Blocks:
    """Add the table of preset probes to `section`: per run its own labels' test mIoU, the
    group-majority mIoU and groups per image on test and val (init in brackets)."""
    return section.table(
        ["world", "encoder", "target", ("seed", "right", "d"), ("steps (batch)", "right"),
         ("test mIoU of its own labels", "right", ".1f"), ("test group-majority mIoU", "right", ".1f"),
         ("groups per test image", "right", ".2f"), ("val group-majority mIoU (init)", "right"), ("minutes", "right", ".1f")],
        [[cfg.style, _recipe(cfg), cfg.target, cfg.seed, f"{r['steps']} ({cfg.batch_size})", r.get("test_miou"),
          r.get("test_group_majority_miou"), r.get("test_groups_per_image"),
          f"{r['group_majority_miou']:.1f} ({r['init_group_majority_miou']:.1f})", r["minutes"]]
         for _, cfg, r in rows])


def benchmark_grouping_probe(configs: list[ProbeConfig], threads: int, command: str = "ovseg bench grouping-probe",
                             echo=print, tag: str = "", progress: bool = False) -> Section:
    """Run every probe (echoing each result) and return the results section, named after the
    grouping, the assignment, the target and the world of the first config (with a preset:
    after the preset, `tag`, the target and the world)."""
    torch.set_num_threads(threads)
    rows = []
    for cfg in configs:
        result = run_probe(cfg, progress=progress)
        name = _recipe(cfg) if cfg.preset else f"{cfg.grouping} {cfg.depth_before}+{cfg.depth_after}"
        echo(f"{name} seed {cfg.seed}: {result}")
        rows.append((cfg.grouping, cfg, result))
    first = configs[0]
    if first.preset:
        return _reference_section(rows, threads, command, tag)
    name = (f"grouping-probe-{first.grouping}-{'hard' if first.hard_assignment else 'soft'}"
            + ("" if first.target == "image" else f"-{first.target}")
            + ("" if first.style == "standard" else f"-{first.style}"))
    world = "" if first.style == "standard" else f", {first.style} world"
    section = Section(name, f"Supervised grouping probe{world} (`ovseg bench grouping-probe`)", command)
    section.text(f"{threads} thread(s); {first.n_train:,} training images, {first.n_val} val images.")
    probe_table(section, rows)
    if first.eval_every:
        curve_table(section, rows)
    return section


def _reference_section(rows: list, threads: int, command: str, tag: str) -> Section:
    first = rows[0][1]
    name = "-".join(part for part in ("grouping-probe", first.preset, tag, first.target,
                                      "" if first.style == "standard" else first.style) if part)
    world = "standard" if first.style == "standard" else first.style
    model = model_config(first)
    through = ("straight through the hard assignment" if model.grouping == "learned" and model.hard_assignment
               else f"through the {model.grouping} grouping's soft assignment")
    section = Section(name, f"Supervised reference for `{first.preset}`'s image encoder, {world} world "
                            f"(`ovseg bench grouping-probe --preset`)", command)
    section.text(f"The preset's own image encoder (with the overrides shown), trained with every pixel's true class "
                 f"through its group ({first.target} target: each assignment cell gets the class vector that its "
                 f"group matches best, {through}), no text; AdamW at lr {first.lr:g}, "
                 f"{threads} thread(s), {first.n_train:,} training images, {first.n_val} val and "
                 f"{first.n_test} test images drawn from the world `ovseg bench synthetic` uses. What the architecture "
                 f"reaches in these steps when it is told the answer, by a plain recipe (a constant learning rate, "
                 f"no augmentation): a reference for the caption-trained runs at the same steps and batch, not a "
                 f"bound on them. Test mIoU of its own labels: every pixel the class of its group, "
                 f"background included (no threshold); group-majority: every group given its majority true label.")
    reference_table(section, rows)
    if first.eval_every:
        init = ("init_groups_per_image", "init_group_majority_miou", "init_miou")
        section.table(["world", "encoder", ("seed", "right", "d"), ("step", "right", "d"),
                       ("groups per val image", "right", ".2f"), ("val group-majority mIoU", "right", ".1f"),
                       ("val mIoU of its own labels", "right", ".1f")],
                      [[cfg.style, _recipe(cfg), cfg.seed, point["step"], point["groups_per_image"],
                        point["group_majority_miou"], point.get("miou")]
                       for _, cfg, r in rows
                       for point in [{"step": 0, "groups_per_image": r[init[0]], "group_majority_miou": r[init[1]],
                                      "miou": r.get(init[2])},
                                     *r.get("curve", ())]])
    return section

"""Does the learned grouping collapse while a preset trains with its own losses, and why?
(`ovseg bench grouping-dynamics`)

A preset's first stage trains on a prepared synthetic world (its DATA folder) through the
engine's own step (`training.engine.train_step`), for a step budget. Every `eval_every` steps the
model is scored on a fixed set of the world's val images, each resized to the training size and
put through the model in one window (as `benchmarks.diagnostics` does):

- the entropy of the soft assignment over the groups (the softmax of the assignment logits, no
  Gumbel noise), in nats, averaged over the patches: log K when every patch is spread evenly over
  the K groups, 0 when each patch sits in one group;
- distinct arg-max groups per image ("groups in use"), and the share of its patches that the
  largest group of an image takes;
- the share of the logits' variance that is a constant per group and image (the variance over
  the groups of each group's mean logit over the patches, against the variance over the patches
  within a group): a constant per group moves every patch of the image the same way, which is
  the direction in which one group can take all of them;
- the group-majority mIoU: each group given the majority true label of its pixels.

Between evaluations the driver records the gradient that reaches the assignment: the norm of
the loss's gradient with respect to the assignment logits (a hook on the logits tensor of the
first grouping block), and, per parameter set, the norm of the gradient over the norm of the
parameters (before clipping; `param_sets`), averaged over the steps since the last evaluation.

Everything is measured from outside the library: a wrapper of the assigner's `logits` method on
the model instance, tensor hooks and post-accumulate-grad hooks on parameters. Two experiment
knobs act the same way, per step, and are not settings of the library: `soft_fraction` (the plain
softmax assignment, no Gumbel, for a share of the first steps) and `tau_end` (the Gumbel temperature
annealed linearly from the model's to this over the budget). A third, `blank_images`, trains on
images made one flat colour (the data set's mean colour): the losses it reaches are
what the captions alone allow, the text-only floor that a model reading the images must go below."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from ovseg.benchmarks.results import Blocks, Section

# parameter sets whose relative gradients are recorded, by name prefix (first match wins)
PARAM_SETS = (
    ("assign q/k", ("image_encoder.grouping.assign.q_proj.", "image_encoder.grouping.assign.k_proj.")),
    ("group tokens", ("image_encoder.group_token",)),
    ("grouping block (rest)", ("image_encoder.grouping.",)),
    ("image encoder (rest)", ("image_encoder.",)),
    ("text and heads", ("",)),
)


@dataclasses.dataclass
class DynamicsConfig:
    name: str = "baseline"           # the row's label
    preset: str = "synthetic-paper"
    overrides: tuple[str, ...] = ()  # `key.sub=value` settings (the remedy a row tries)
    steps: int = 600                 # stage 1 steps
    batch_size: int | None = None    # None: the preset's stage 1 batch
    eval_every: int = 100
    n_val: int = 100                 # the fixed val images scored every `eval_every` steps
    seed: int = 0
    soft_fraction: float = 0.0       # experiment: plain softmax assignment for this share of the steps
    tau_end: float | None = None     # experiment: Gumbel temperature annealed linearly to this
    group_token_std: float | None = None  # experiment: the group tokens drawn again at this std
    logit_gain: float = 1.0          # experiment: the assignment logits multiplied by this (vs. the Gumbel noise)
    blank_images: bool = False       # experiment: every training image made one flat colour (the text-only floor)


# the runs `ovseg bench grouping-dynamics --runs` knows by name: DynamicsConfig fields (the
# remedy each tries), on top of the command's own budget, batch and overrides
RUNS: dict[str, dict] = {
    "baseline": {},
    "soft": {"overrides": ("model.hard_assignment=false",)},  # the plain softmax throughout
    "soft-early": {"soft_fraction": 0.5},                     # the softmax for the first half
    "tau-anneal": {"tau_end": 0.1},
    "tau-0.3": {"overrides": ("model.gumbel_tau=0.3",)},
    "tokens-std-1": {"group_token_std": 1.0},
    "logits-x8": {"logit_gain": 8.0},
    "center": {"overrides": ("model.assign_center=true",)},
    "center-soft": {"overrides": ("model.assign_center=true", "model.hard_assignment=false")},
    "center-x8": {"overrides": ("model.assign_center=true",), "logit_gain": 8.0},
    # does the model learn to name shapes at all? ovseg's switches that help a model from scratch
    "conv": {"overrides": ("model.patch_embed=conv",)},              # timm's convolutional stem
    "cnn": {"overrides": ("model.patch_embed=cnn",)},                # synthetic-small's CNN
    "grounding": {"overrides": ("train.stages.1.losses=[contrastive,entity,grounding]",)},
    "conv-center": {"overrides": ("model.patch_embed=conv", "model.assign_center=true")},
    "conv-grounding": {"overrides": ("model.patch_embed=conv", "train.stages.1.losses=[contrastive,entity,grounding]")},
    "lr-3e-3": {"overrides": ("optim.lr=3e-3", "optim.min_lr=7.5e-4", "optim.warmup_lr=7.5e-5")},
    # the 2-layer BERT from scratch without the paper's dropout; and the CNN stem with no
    # transformer block, as synthetic-small's learned-grouping ablation has it
    "text-dropout-0": {"overrides": ("model.text_dropout=0.0",)},
    "cnn-flat": {"overrides": ("model.patch_embed=cnn", "model.depth_before=0", "model.depth_after=0")},
    "cnn-flat-text-dropout-0": {"overrides": ("model.patch_embed=cnn", "model.depth_before=0", "model.depth_after=0",
                                              "model.text_dropout=0.0")},
    "cnn-flat-noise-global": {"overrides": ("model.patch_embed=cnn", "model.depth_before=0", "model.depth_after=0",
                                            "train.noise=global")},
    # the full synthetic-paper model (2 + 2 blocks) with the switches that let it name shapes,
    # and with those that keep its groups apart (centred logits) or ask a group to hold each entity
    "cnn-text-dropout-0": {"overrides": ("model.patch_embed=cnn", "model.text_dropout=0.0")},
    "cnn-text-dropout-0-center": {"overrides": ("model.patch_embed=cnn", "model.text_dropout=0.0",
                                                "model.assign_center=true")},
    "cnn-text-dropout-0-grounding": {"overrides": ("model.patch_embed=cnn", "model.text_dropout=0.0",
                                                   "train.stages.1.losses=[contrastive,entity,grounding]")},
    "cnn-text-dropout-0-center-grounding": {"overrides": ("model.patch_embed=cnn", "model.text_dropout=0.0",
                                                          "model.assign_center=true",
                                                          "train.stages.1.losses=[contrastive,entity,grounding]")},
}
# and, on top of that remedy, the settings in which synthetic-paper still differs from
# synthetic-small, whose groups get named: does one of them slow the naming?
REMEDY = "cnn-text-dropout-0-center-grounding"
RUNS |= {
    f"{REMEDY}-contrastive-0.1": {"overrides": (*RUNS[REMEDY]["overrides"], "model.loss_weights.contrastive=0.1")},
    f"{REMEDY}-drop-path-0": {"overrides": (*RUNS[REMEDY]["overrides"], "model.drop_path=0.0")},
    f"{REMEDY}-lr-3e-3": {"overrides": (*RUNS[REMEDY]["overrides"], *RUNS["lr-3e-3"]["overrides"])},
    # the remedy trained on flat images: how low its losses go on the captions alone
    f"{REMEDY}-text-only": {"overrides": RUNS[REMEDY]["overrides"], "blank_images": True},
}


def named_config(name: str, **fields) -> DynamicsConfig:
    """The run `name` of `RUNS` with `fields` (budget, batch, seed...); overrides add up."""
    if name not in RUNS:
        raise KeyError(f"unknown run {name!r}; known: {', '.join(RUNS)}")
    run = dict(RUNS[name])
    overrides = (*fields.pop("overrides", ()), *run.pop("overrides", ()))
    return DynamicsConfig(name=name, overrides=overrides, **{**fields, **run})


def param_set(name: str) -> str:
    """The parameter set (`PARAM_SETS`) that the parameter `name` of the OVSegmentor belongs to."""
    return next(label for label, prefixes in PARAM_SETS if any(name.startswith(p) for p in prefixes))


class GradientProbe:
    """Hooks on a model that record, per optimiser step, the norm of the gradient reaching the
    first grouping block's assignment logits and each parameter set's gradient norm (and keep
    the last logits it saw, for the evaluation's statistics)."""

    def __init__(self, model, gain: float = 1.0):
        import torch

        self.assign = model.image_encoder.grouping.assign
        self.logit_sq = 0.0
        self.sq = {label: 0.0 for label, _ in PARAM_SETS}
        self.params = {label: [] for label, _ in PARAM_SETS}
        self.handles = []
        self.last_logits = None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            label = param_set(name)
            self.params[label].append(p)
            self.handles.append(p.register_post_accumulate_grad_hook(self._on_grad(label)))
        original = self.assign.logits

        def logits(queries, x):
            raw = original(queries, x) * gain  # (B, K, N)
            self.last_logits = raw.detach()
            if raw.requires_grad and torch.is_grad_enabled():
                raw.register_hook(self._on_logit_grad)
            return raw

        self.assign.logits = logits  # an instance attribute: the class's method is untouched
        self._original = original

    def _on_grad(self, label: str):
        def hook(p):
            self.sq[label] += float(p.grad.detach().float().pow(2).sum())
        return hook

    def _on_logit_grad(self, grad):
        self.logit_sq += float(grad.detach().float().pow(2).sum())

    def take(self) -> dict[str, float]:
        """This step's gradient norms (and each set's over its parameters' norm); resets."""
        out = {"logit_grad": math.sqrt(self.logit_sq)}
        for label, params in self.params.items():
            weight = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params)) or 1.0
            out[f"grad/{label}"] = math.sqrt(self.sq[label])
            out[f"relgrad/{label}"] = math.sqrt(self.sq[label]) / weight
        self.logit_sq = 0.0
        self.sq = {label: 0.0 for label in self.sq}
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        del self.assign.logits


def val_images(voc_dir: Path, model, n: int):
    """The first `n` val images of the world (resized and normalised as in training), their labels,
    the number of classes and the val split itself."""
    from ovseg.benchmarks.diagnostics import model_images
    from ovseg.evaluation.datasets import load_synthetic

    data = load_synthetic(Path(voc_dir), split="val")
    items = [data.load(i) for i in range(min(n, len(data)))]
    return model_images(model, [im for im, _ in items]), [lb for _, lb in items], len(data.classes), data


def grouping_state(model, probe: GradientProbe, images, labels, n_classes: int, batch_size: int = 50,
                   dataset=None) -> dict[str, float]:
    """The assignment's statistics on the fixed val images (see the module doc); with the val
    `dataset` they come from, also whether the model names what it groups (`image_named`: the image
    embedding's best class prompt is a present shape; `groups_named`: an object group's best prompt
    is its object's shape; both in %, from `benchmarks.diagnostics.group_diagnostics`)."""
    import torch
    import torch.nn.functional as F

    from ovseg.benchmarks.diagnostics import group_diagnostics
    from ovseg.evaluation.metrics import ConfusionMatrix, group_majority_labels

    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(n_classes)
    entropy = groups = largest = between = within = 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out = model.encode_image(images[start:start + batch_size])
            soft = out.assignment.float()  # (B, K, h, w)
            entropy += float(-(soft * soft.clamp_min(1e-12).log()).sum(1).mean((1, 2)).sum())
            raw = probe.last_logits.float()  # (B, K, N)
            between += float(raw.mean(-1).var(-1, unbiased=False).sum())
            within += float(raw.var(-1, unbiased=False).mean(-1).sum())
            best = soft.flatten(2).argmax(1)  # (B, N)
            for j, label in enumerate(labels[start:start + batch_size]):
                counts = torch.bincount(best[j], minlength=soft.shape[1])
                groups += int((counts > 0).sum())
                largest += float(counts.max()) / best.shape[1]
                up = F.interpolate(soft[j:j + 1], size=label.shape, mode="nearest")[0].numpy()
                matrix.update(label, group_majority_labels(up, label, n_classes))
    named = {}
    if dataset is not None:
        found = group_diagnostics(model, dataset, limit=len(images), batch_size=batch_size)
        named = {"image_named": 100 * found["image_top1_present"], "groups_named": 100 * float(np.nan_to_num(found["group_accuracy"]))}
    model.train(was_training)
    n = len(images)
    return {**named, "entropy": entropy / n, "groups_per_image": groups / n, "largest_group_share": largest / n,
            "group_constant_share": between / max(between + within, 1e-12),
            "logit_between_std": math.sqrt(between / n), "logit_within_std": math.sqrt(within / n),
            "group_majority_miou": 100 * float(np.nan_to_num(matrix.compute().miou))}


def blank(micro_batches: list[dict]) -> list[dict]:
    """A step's micro-batches with every image made one flat colour (zero after normalisation:
    the data set's mean colour): the model sees the captions and nothing of the images."""
    from ovseg.training.data import IMAGE_FIELDS

    return [{k: v.zero_() if k in IMAGE_FIELDS else v for k, v in batch.items()} for batch in micro_batches]


def _config(cfg: DynamicsConfig, data_dir: Path):
    from ovseg.training.config import resolve

    overrides = [*cfg.overrides, f"data.data_dir={data_dir}", "train.stage=1", f"train.stages.1.steps={cfg.steps}",
                 f"train.seed={cfg.seed}", "train.ema_decay=0.0", "data.num_workers=0"]
    if cfg.batch_size:
        overrides.append(f"train.stages.1.batch_size={cfg.batch_size}")
    return resolve(cfg.preset, overrides=overrides)


def run_dynamics(data_dir: Path, voc_dir: Path, cfg: DynamicsConfig, run_dir: Path | None = None,
                 echo=None) -> dict:
    """Train stage 1 of `cfg.preset` on DATA for `cfg.steps` steps, recording the curves (the
    module doc); `voc_dir` is the world's VOC folder, whose val split is scored. Returns the
    run's settings, its minutes in `train_step` (forward, backward, optimiser: data loading and
    evaluations left out) and `curve`, one point per
    evaluation (step 0 is the initialisation), each with the mean gradient statistics of the
    steps since the one before."""
    import torch

    from ovseg.training import distributed as dist_utils
    from ovseg.training.engine import setup_run, step_batches, train_step

    run_cfg = _config(cfg, Path(data_dir))
    info = dist_utils.setup("cpu")
    with tempfile.TemporaryDirectory() as scratch:
        run = setup_run(run_cfg, Path(run_dir) if run_dir else Path(scratch), info)
        model = run.model
        model.train()
        if cfg.group_token_std is not None:
            with torch.no_grad():
                torch.nn.init.trunc_normal_(model.image_encoder.group_token, std=cfg.group_token_std,
                                            a=-2 * cfg.group_token_std, b=2 * cfg.group_token_std)
        probe = GradientProbe(model, cfg.logit_gain)
        images, labels, n_classes, val = val_images(voc_dir, model, cfg.n_val)
        assign = probe.assign
        tau0, hard0 = assign.tau, assign.hard
        curve = [{"step": 0, **grouping_state(model, probe, images, labels, n_classes, dataset=val)}]
        window: list[dict[str, float]] = []
        batches = step_batches(run)
        training_s = 0.0
        try:
            while run.step < run.total_steps:
                if cfg.tau_end is not None:
                    assign.tau = tau0 + (cfg.tau_end - tau0) * run.step / max(1, run.total_steps - 1)
                assign.hard = hard0 and run.step >= cfg.soft_fraction * run.total_steps
                micro_batches = next(batches)
                if cfg.blank_images:
                    micro_batches = blank(micro_batches)
                started = time.perf_counter()
                losses = train_step(run, micro_batches)
                training_s += time.perf_counter() - started
                window.append({**probe.take(), **{f"loss/{k}": v for k, v in losses.items()}})
                if run.step % cfg.eval_every == 0 or run.step == run.total_steps:
                    means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    curve.append({"step": run.step, **grouping_state(model, probe, images, labels, n_classes, dataset=val),
                                  **means, "tau": float(assign.tau)})
                    window = []
                    if echo:
                        echo(f"{cfg.name} " + " ".join(f"{k}={v:.4g}" for k, v in curve[-1].items()))
        finally:
            probe.remove()
            dist_utils.teardown()
    return {"name": cfg.name, "preset": cfg.preset, "overrides": list(cfg.overrides), "steps": run.step,
            "batch_size": run.stage.batch_size or run.cfg.train.batch_size, "soft_fraction": cfg.soft_fraction,
            "tau_end": cfg.tau_end, "group_token_std": cfg.group_token_std, "logit_gain": cfg.logit_gain, "blank_images": cfg.blank_images, "seed": cfg.seed, "n_val": len(images), "num_groups": int(run_cfg.model.num_groups),
            "minutes": training_s / 60, "threads": torch.get_num_threads(), "curve": curve}


def _setting(r: dict) -> str:
    parts = [f"`{o}`" for o in r["overrides"]]
    if r["soft_fraction"]:
        parts.append(f"soft assignment for the first {100 * r['soft_fraction']:.0f}% of the steps")
    if r["tau_end"] is not None:
        parts.append(f"Gumbel tau annealed to {r['tau_end']:g}")
    if r.get("group_token_std") is not None:
        parts.append(f"group tokens drawn at std {r['group_token_std']:g}")
    if r.get("logit_gain", 1.0) != 1.0:
        parts.append(f"assignment logits x {r['logit_gain']:g}")
    if r.get("blank_images"):
        parts.append("flat images (the captions alone)")
    return ", ".join(parts) or "(preset as is)"


def summary_table(section: Blocks, results: list[dict]) -> Blocks:
    """One row per run: its setting, then its val statistics at init and at the end of its budget."""
    rows = []
    for r in results:
        first, last = r["curve"][0], r["curve"][-1]
        rows.append([r["name"], _setting(r), f"{r['steps']} ({r['batch_size']})", r["seed"],
                     f"{last['entropy']:.2f} ({first['entropy']:.2f})",
                     f"{last['groups_per_image']:.2f} ({first['groups_per_image']:.2f})",
                     f"{last['group_majority_miou']:.1f} ({first['group_majority_miou']:.1f})",
                     *(f"{last[k]:.1f} ({first[k]:.1f})" if k in last else "-" for k in ("image_named", "groups_named")),
                     r["minutes"]])
    return section.table(["run", "setting", ("steps (batch)", "right"), ("seed", "right", "d"),
                          ("entropy, nats (init)", "right"), ("groups per val image (init)", "right"),
                          ("group-majority mIoU (init)", "right"), ("image names a present shape, % (init)", "right"),
                          ("object groups named right, % (init)", "right"), ("minutes", "right", ".1f")], rows)


def curve_table(section: Blocks, results: list[dict]) -> Blocks:
    """Every run's curve: val statistics at each evaluation and the mean gradients before it."""
    rows = []
    for r in results:
        for p in r["curve"]:
            rel = p.get("relgrad/assign q/k")
            ratio = rel / p["relgrad/image encoder (rest)"] if rel is not None and p["relgrad/image encoder (rest)"] else None
            rows.append([r["name"], r["seed"], p["step"], p["entropy"], p["groups_per_image"], p["largest_group_share"],
                         p["group_constant_share"], p.get("logit_between_std"), p.get("logit_within_std"),
                         p["group_majority_miou"], p.get("image_named"), p.get("groups_named"), p.get("logit_grad"), rel, ratio,
                         p.get("loss/entity"), p.get("loss/loss")])
    return section.table(["run", ("seed", "right", "d"), ("step", "right", "d"), ("entropy", "right", ".3f"), ("groups / image", "right", ".2f"),
                          ("largest group", "right", ".2f"), ("per-group constant", "right", ".2f"),
                          ("logit between", "right", ".2f"), ("logit within", "right", ".2f"),
                          ("group-majority mIoU", "right", ".1f"), ("image named", "right", ".1f"),
                          ("groups named", "right", ".1f"), ("logit grad", "right", ".2e"),
                          ("q/k rel. grad", "right", ".2e"), ("q/k / encoder rel. grad", "right", ".2f"),
                          ("entity loss", "right", ".3f"), ("loss", "right", ".3f")], rows)


# DynamicsConfig fields added after runs were stored, with their defaults: at the default they are
# left out of a run's stored config (and its digest)
LATER_FIELDS = {"blank_images": False}


def cached_run(out: Path, data_dir: Path, voc_dir: Path, cfg: DynamicsConfig, echo=None) -> dict:
    """`run_dynamics`'s result for `cfg`, read back from OUT/runs/NAME-seedS-HASH.json (HASH: of the
    whole config) when that file holds a run of the same config, else trained, measured and stored there (so that runs can be
    spread over several processes and sessions, and the section rendered from all of them)."""
    import hashlib
    import json

    asked = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as stored
    for key, default in LATER_FIELDS.items():  # runs stored before the field existed still match
        if asked.get(key) == default:
            del asked[key]
    digest = hashlib.sha1(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(out) / "runs" / f"{cfg.name}-seed{cfg.seed}-{digest}.json"
    if path.exists():
        held = json.loads(path.read_text())
        if held.get("config") == asked:
            return held["result"]
    result = run_dynamics(data_dir, voc_dir, cfg, echo=echo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": asked, "result": result}))
    tmp.replace(path)
    return result


def benchmark_grouping_dynamics(out: Path, data_dir: Path, voc_dir: Path, configs: list[DynamicsConfig],
                                threads: int, style: str = "standard", command: str = "ovseg bench grouping-dynamics",
                                echo=print, tag: str = "") -> Section:
    """Run every config (or read it back from OUT, `cached_run`), echoing each curve point, and
    return the results section `grouping-dynamics-STEPS` (`grouping-dynamics-textured-STEPS` on
    that world; `-TAG` after it when tagged, so that another study at the same budget gets a
    section of its own), STEPS the first config's budget."""
    import torch

    torch.set_num_threads(threads)
    results = [cached_run(out, data_dir, voc_dir, cfg, echo=echo) for cfg in configs]
    first = results[0]
    name = "-".join(["grouping-dynamics", *([style] if style != "standard" else []), str(configs[0].steps),
                     *([tag] if tag else [])])
    section = Section(name, f"Learned grouping over {configs[0].steps} training steps, {style} world"
                            + (f", study `{tag}`" if tag else "") + " (`ovseg bench grouping-dynamics`)", command)
    section.text(f"Stage 1 of `{first['preset']}` ({first['threads']} thread(s)); {first['n_val']} fixed val images "
                 f"scored every {configs[0].eval_every} steps at the training size. Entropy: of the soft assignment "
                 f"over the {first['num_groups']} groups (at most log {first['num_groups']} = "
                 f"{math.log(first['num_groups']):.2f} nats), averaged over the patches. Groups per image: distinct "
                 "arg-max groups. Largest group: its share of an image's patches. Per-group constant: the share of "
                 "the assignment logits' variance that is one constant per group and image; logit between and "
                 "within: the std over the groups of each group's mean logit over the patches, and the std over the "
                 "patches within a group. Logit grad: the norm of "
                 "the loss's gradient at the assignment logits; q/k rel. grad: the gradient norm of the assignment's "
                 "query and key projections over their weights' norm (before clipping), and its ratio to the rest of "
                 "the image encoder's; both the mean over the steps since the evaluation before. Image named: "
                 "the share of the val images whose image embedding's best class prompt is a shape present in "
                 "them; groups named: the share of the groups covering mostly an object whose best prompt is "
                 "that object's shape (both as in the synthetic section's diagnostics). Minutes: in the "
                 "training step (forward, backward, optimiser), data loading and evaluations left out.")
    summary_table(section, results)
    section.heading("Curves")
    curve_table(section, results)
    return section

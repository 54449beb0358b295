"""How much of the synthetic world's segmentation an untrained model's grouping already gives:
the random-init group-majority mIoU of presets on each world style (`ovseg bench world`).

A random model names no group, so its mIoU is chance; but each of its groups, given the majority
true label of its pixels, scores what its grouping alone allows. Where that is near the grid's
ceiling, the world draws the masks for the grouping (flat-coloured shapes fall into colour
clusters) and a benchmark on it measures only whether groups get named. The textured style is
made so that it does not: the clustering recipe's random grouping should score low there, and a
learned grouping has something to learn. The numbers are the chance and ceiling rows of `ovseg
bench synthetic`, on worlds drawn apart (val and test splits only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ovseg.benchmarks.results import Blocks, Section


@dataclass
class Difficulty:
    style: str
    preset: str
    grid: int
    miou: float                 # chance: the random model's mIoU (threshold chosen on val)
    group_majority_miou: float  # what the random grouping allows
    ceiling: float              # every cell of the grid given its majority label


def world_difficulty(out: Path, styles: tuple[str, ...] = ("standard", "textured"),
                     presets: tuple[str, ...] = ("synthetic-small", "synthetic-paper"), seed: int = 0,
                     n_val: int = 100, n_test: int = 300) -> list[Difficulty]:
    """The random-init scores of every preset on a world of every style (the world drawn once
    under OUT/world-STYLE, with `ovseg bench synthetic`'s val and test sizes)."""
    from ovseg.benchmarks.synthetic import patch_grid_ceiling, random_init
    from ovseg.curation.synthetic import WorldConfig, generate
    from ovseg.training.config import resolve
    from ovseg.training.model.image_encoder import assignment_grid

    rows = []
    for style in styles:
        world = generate(out / f"world-{style}", WorldConfig(n_train=0, n_val=n_val, n_test=n_test, style=style))
        for preset in presets:
            grid = assignment_grid(resolve(preset).model)
            scores = random_init(world, out / f"random-{style}-{preset}", seed, preset)
            rows.append(Difficulty(style, preset, grid, scores["miou"], scores["group_majority_miou"],
                                   patch_grid_ceiling(world, grid)))
    return rows


def benchmark_world(out: Path, styles: tuple[str, ...], presets: tuple[str, ...], seed: int = 0,
                    command: str = "ovseg bench world") -> Section:
    """`world_difficulty`'s rows as the results section `world`."""
    rows = world_difficulty(out, styles, presets, seed)
    section = Section("world", "What an untrained grouping gives on each world (`ovseg bench world`)", command)
    section.text("Random-init models on the test split (300 images; threshold chosen on val): chance mIoU, the "
                 "group-majority mIoU (each group given the majority true label of its pixels: what the grouping "
                 "alone allows) and the ceiling of the grid the groups are drawn on.")
    return difficulty_table(section, rows)


def difficulty_table(section: Blocks, rows: list[Difficulty]) -> Blocks:
    """Add one row per (world style, preset), in percent, to `section`."""
    return section.table(["world", "preset (random init)", ("mIoU (chance)", "right", ".1f"),
                          ("group-majority mIoU", "right", ".1f"), ("grid ceiling", "right")],
                         [[r.style, r.preset, 100 * r.miou, 100 * r.group_majority_miou,
                           f"{100 * r.ceiling:.1f} ({r.grid}x{r.grid})"] for r in rows])

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402

from ovseg.benchmarks.world_difficulty import Difficulty, difficulty_table, world_difficulty  # noqa: E402
from ovseg.curation.synthetic import load_config  # noqa: E402


@pytest.mark.slow  # draws two worlds and evaluates two random models: tens of seconds
def test_random_init_scores_of_each_style_and_preset_come_with_chance_and_ceiling(tmp_path):
    rows = world_difficulty(tmp_path, styles=("standard", "textured"), presets=("test",), n_val=2, n_test=3)
    assert [(r.style, r.preset, r.grid) for r in rows] == [("standard", "test", 4), ("textured", "test", 4)]
    assert load_config(tmp_path / "world-textured").style == "textured"
    for r in rows:
        assert 0 <= r.miou <= 1 and 0 <= r.group_majority_miou <= 1 and 0 < r.ceiling <= 1
    from ovseg.benchmarks.results import Blocks, render_blocks

    table = render_blocks(difficulty_table(Blocks(), [Difficulty("textured", "synthetic-small", 32, 0.065, 0.384, 0.976)]).blocks)
    assert "| textured | synthetic-small | 6.5 | 38.4 | 97.6 (32x32) |" in table

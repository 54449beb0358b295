import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ovseg.benchmarks.grouping_probe import ProbeConfig, grouping_scores, _world, Probe  # noqa: E402
from ovseg.cli.main import app  # noqa: E402
from ovseg.curation.synthetic import WorldConfig, classes  # noqa: E402

TINY = dict(width=32, heads=2, depth_before=1, depth_after=0, num_group_tokens=4, num_groups=4,
            n_train=16, n_val=4, batch_size=8)


def test_the_probe_counts_groups_and_scores_a_grouping_that_follows_the_truth_at_the_ceiling():
    cfg = ProbeConfig(**TINY)
    world = WorldConfig()
    n_classes = len(classes(world))
    images, hot, maps = _world(cfg, "val", 4, world)
    assert images.shape == (4, 3, 32, 32) and hot.shape == (4, n_classes - 1)
    assert all(hot[i].sum() >= 1 for i in range(4))  # every scene holds at least one named shape

    class Oracle(Probe):  # groups = the true label map itself, one group per class
        def forward(self, x):
            index = [int(i) for i in self._batch]
            maps_ = torch.stack([torch.from_numpy(maps[i]).long() for i in index])
            maps_[maps_ == 255] = 0
            one_hot = torch.nn.functional.one_hot(maps_, n_classes).permute(0, 3, 1, 2).float()
            return None, one_hot

    oracle = Oracle(cfg, n_classes - 1)
    oracle._batch = range(4)
    scores = grouping_scores(oracle, images, maps, n_classes)
    assert scores["group_majority_miou"] == pytest.approx(100.0)
    distinct = sum(len(set(m[m != 255].ravel().tolist())) for m in maps) / 4
    assert scores["groups_per_image"] == pytest.approx(distinct)


def test_grouping_probe_cli_writes_its_section(tmp_path, monkeypatch):
    import ovseg.benchmarks.grouping_probe as probe

    monkeypatch.setattr(probe, "ProbeConfig", lambda **kw: ProbeConfig(**{**kw, **TINY}))
    doc = tmp_path / "bench.md"
    result = CliRunner().invoke(app, ["bench", "grouping-probe", "--steps", "2", "--depths", "1+0", "--doc", str(doc), "--results", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "<!-- bench:grouping-probe-learned-hard -->" in text
    assert "| standard | learned | hard (Gumbel) | image | 1 + 0 | 0 | 2 (8) |" in text


def test_the_textured_pixel_probe_writes_its_own_section_with_its_curve(tmp_path, monkeypatch):
    import ovseg.benchmarks.grouping_probe as probe

    monkeypatch.setattr(probe, "ProbeConfig", lambda **kw: ProbeConfig(**{**kw, **TINY}))
    doc = tmp_path / "bench.md"
    result = CliRunner().invoke(app, ["bench", "grouping-probe", "--steps", "2", "--depths", "1+0", "--style", "textured",
                                      "--target", "pixels", "--eval-every", "1", "--doc", str(doc), "--results", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "<!-- bench:grouping-probe-learned-hard-pixels-textured -->" in text
    assert "| textured | learned | hard (Gumbel) | pixels | 1 + 0 | 0 | 2 (8) |" in text
    # the curve: the init (step 0), step 1, and the end
    curve = "| textured | learned | hard (Gumbel) | pixels | 1 + 0 | 0 | "
    assert [line.split(" | ")[6] for line in text.splitlines() if line.startswith(curve)
            and line.count("|") == 10] == ["0", "1", "2"]
    for bad, message in ((["--target", "masks"], "takes image or pixels"), (["--style", "fancy"], "takes standard or textured")):
        result = CliRunner().invoke(app, ["bench", "grouping-probe", "--steps", "1", *bad, "--doc", str(doc), "--results", str(tmp_path / "results")])
        assert result.exit_code == 2 and message in result.output


def test_the_pixel_target_trains_the_assignment_through_the_hard_one_hot():
    cfg = ProbeConfig(**TINY, target="pixels")
    world = WorldConfig(style="textured")
    n_classes = len(classes(world))
    images, _, _ = _world(cfg, "val", 2, world)
    model = Probe(cfg, n_classes - 1)
    logits = model.pixel_logits(images)
    assert logits.shape == (2, n_classes, 8, 8)
    logits.logsumexp(1).sum().backward()
    assign = model.encoder.grouping.assign  # the assignment's query and key projections get a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in assign.parameters() if p.requires_grad)

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
        def scored(self, x):
            index = [int(i) for i in self._batch]
            maps_ = torch.stack([torch.from_numpy(maps[i]).long() for i in index])
            maps_[maps_ == 255] = 0
            one_hot = torch.nn.functional.one_hot(maps_, n_classes).permute(0, 3, 1, 2).float()
            return one_hot, None

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


def test_a_preset_probe_trains_that_presets_own_encoder():
    from ovseg.benchmarks.grouping_probe import model_config

    cfg = ProbeConfig(preset="synthetic-paper", overrides=("model.width=64", "model.patch_embed=cnn"), target="pixels")
    model = model_config(cfg)
    assert (model.width, model.patch_embed, model.image_size, model.num_groups) == (64, "cnn", 32, 8)
    probe = Probe(cfg, 5)
    assert probe.pixel_classes.shape == (6, 64)
    from ovseg.training.model.image_encoder import CNNPatchEmbed

    assert isinstance(probe.encoder.patch_embed, CNNPatchEmbed) and probe.encoder.group_token.shape == (1, 16, 64)


def test_the_pixel_probe_scores_its_own_labels_and_an_oracle_scores_100():
    cfg = ProbeConfig(**TINY, target="pixels")
    world = WorldConfig()
    n_classes = len(classes(world))
    images, _, maps = _world(cfg, "val", 4, world)

    def truth():
        stacked = torch.stack([torch.from_numpy(m).long() for m in maps])
        stacked[stacked == 255] = 0
        return torch.nn.functional.one_hot(stacked, n_classes).permute(0, 3, 1, 2).float()

    class Oracle(Probe):  # one group per class, drawn on the true label map; each names its own class
        def scored(self, x):
            return truth(), truth()

    scores = grouping_scores(Oracle(cfg, n_classes - 1), images, maps, n_classes)
    assert scores["miou"] == pytest.approx(100.0) and scores["group_majority_miou"] == pytest.approx(100.0)

    class Background(Oracle):  # the same groups, every one called background
        def scored(self, x):
            logits = torch.zeros_like(truth())
            logits[:, 0] = 1.0
            return truth(), logits

    scores = grouping_scores(Background(cfg, n_classes - 1), images, maps, n_classes)
    # every labelled pixel called background: background's IoU is its share, every other class 0
    valid = [m[m != 255] for m in maps]
    share = sum(int((v == 0).sum()) for v in valid) / sum(v.size for v in valid)
    present = len(set().union(*(set(v.tolist()) for v in valid)))
    assert scores["group_majority_miou"] == pytest.approx(100.0)
    assert scores["miou"] == pytest.approx(100 * share / present)


def test_the_preset_probe_cli_writes_a_ceiling_section_with_test_scores(tmp_path, monkeypatch):
    import ovseg.benchmarks.grouping_probe as probe

    monkeypatch.setattr(probe, "ProbeConfig", lambda **kw: ProbeConfig(**{**kw, "n_train": 16, "n_val": 4, "n_test": 4}))
    doc, results = tmp_path / "bench.md", tmp_path / "results"
    small = ["model.width=32", "model.heads=2", "model.depth_before=1", "model.depth_after=0", "model.num_group_tokens=4",
             "model.num_groups=4"]
    result = CliRunner().invoke(app, ["bench", "grouping-probe", "--preset", "synthetic-paper", "--tag", "tiny", "--target",
                                      "pixels", "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--doc", str(doc),
                                      "--results", str(results), *small], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "<!-- bench:grouping-probe-synthetic-paper-tiny-pixels -->" in text
    row = next(line for line in text.splitlines() if line.startswith("| standard | `synthetic-paper`, `model.width=32`")
               and line.count("|") == 11)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == ["pixels", "0", "2 (4)"]
    assert 0.0 <= float(cells[5]) <= 100.0 and 0.0 <= float(cells[6]) <= 100.0  # test mIoU and group-majority
    curve = [line for line in text.splitlines() if line.startswith("| standard | `synthetic-paper`") and line.count("|") == 8]
    assert [line.split(" | ")[3] for line in curve] == ["0", "1", "2"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "synthetic-paper", "--depths", "1+1"], "with --preset give model.depth_before"),
    (["--preset", "synthetic-paper", "model.width=32"], "needs a name for its results section"),
    (["--preset", "synthetic-paper", "--tag", "x", "optim.lr=0.1"], "only model.* overrides apply"),
    (["--preset", "no-such-preset"], "unknown preset"),
    (["model.width=32"], "go with --preset"),
    (["--preset", "synthetic-paper", "--tag", "a b"], "takes letters, digits and dashes"),
])
def test_the_preset_probe_refuses_what_it_cannot_honour(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "grouping-probe", "--steps", "1", *args, "--doc", str(tmp_path / "b.md"),
                                      "--results", str(tmp_path / "results")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b.md").exists()


def test_scoring_reads_the_assignment_and_the_cell_logits_of_one_encoder_pass():
    cfg = ProbeConfig(**TINY, target="pixels")
    world = WorldConfig()
    images, _, _ = _world(cfg, "val", 2, world)
    probe = Probe(cfg, len(classes(world)) - 1).eval()
    calls = []
    probe.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assignment, logits = probe.scored(images)
        assert len(calls) == 1
        assert torch.equal(assignment, probe(images)[1]) and torch.equal(logits, probe.pixel_logits(images))

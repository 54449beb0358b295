"""Checkpoints: atomic writes, last.pt follows the newest, only the last N kept, weights-only load."""

import pytest
import torch

from ovseg.training import checkpoint as ckpt


def _state(step):
    return {"model": {"w": torch.full((2,), float(step))}, "step": step, "config": {"a": [1, 2]},
            "rng": {"cpu": torch.get_rng_state()}}


def test_save_keeps_the_last_n_and_last_points_at_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.save(_state(step), tmp_path, step, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-00000006.pt", "step-00000008.pt"]  # no temporary files left
    assert ckpt.latest(tmp_path).name == "step-00000008.pt"
    state = ckpt.load(tmp_path / "last.pt")
    assert state["step"] == 8 and torch.equal(state["model"]["w"], torch.full((2,), 8.0))


def test_a_partial_write_is_never_taken_for_a_checkpoint(tmp_path):
    ckpt.save(_state(2), tmp_path, 2)
    (tmp_path / "ckpt" / "step-00000004.pt.tmp").write_bytes(b"half a file")  # killed mid-write
    assert ckpt.latest(tmp_path).name == "step-00000002.pt"


def test_latest_of_an_empty_run_is_none(tmp_path):
    assert ckpt.latest(tmp_path) is None


# -- loading a model never re-runs its initialisations ----------------------------------------

def _tiny_bert_dir(path):
    """A local transformers BERT folder (model + fast tokenizer), as `text_pretrained` names one."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "photo", "of", "cat"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    # heads show in no weight shape: an older checkpoint's are taken as hidden size / 64, as in BERT-base
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=64)).save_pretrained(path)
    return path


def _pretrained_run_state(tmp_path, record: bool):
    """A checkpoint as `ovseg train` writes it for a run that started from a local BERT folder
    and a DINO file (`record`: with the text encoder's config, as runs now keep it)."""
    import dataclasses

    from ovseg.training.config import RunConfig, to_dict
    from ovseg.training.model import ModelConfig, build_model
    from ovseg.training.presets import get_preset
    from tests.training.test_model import write_dino_checkpoint

    bert = _tiny_bert_dir(tmp_path / "tiny-bert")
    dino = tmp_path / "dino.pth"
    write_dino_checkpoint(dino)
    cfg = dataclasses.replace(ModelConfig(**get_preset("test")["model"]), text_pretrained=str(bert),
                              vision_init=str(dino))
    model = build_model(cfg).eval()
    if record:
        cfg = dataclasses.replace(cfg, text_config=model.text_encoder.config_dict())
    state = {"model": model.state_dict(), "config": to_dict(RunConfig(model=cfg)),
             **ckpt.tokenizer_state(model.tokenizer)}
    return model, state, bert, dino


def _remove_sources_and_refuse_initialisations(monkeypatch, bert, dino) -> None:
    """Delete the BERT folder and the DINO file, and make any attempt to initialise from a
    pretrained source fail the test."""
    import shutil

    import ovseg.training.model.image_encoder as image_encoder
    import ovseg.training.model.text_encoder as text_encoder

    shutil.rmtree(bert)
    dino.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("an initialisation was re-run")

    monkeypatch.setattr(text_encoder, "_from_pretrained", refuse)
    monkeypatch.setattr(text_encoder, "load_text_tokenizer", refuse)
    monkeypatch.setattr(image_encoder, "load_dino", refuse)


@pytest.mark.parametrize("record", [True, False], ids=["text-config-recorded", "older-checkpoint"])
def test_a_checkpoint_loads_without_its_text_pretrained_and_vision_init(tmp_path, monkeypatch, record):
    """The weights come from the checkpoint: loading it on another machine (no BERT folder, no
    DINO file, no hub) builds the text encoder from the recorded config (or, for checkpoints
    written before it was recorded, from the weights' shapes) and gives the same outputs."""
    model, state, bert, dino = _pretrained_run_state(tmp_path, record)
    torch.save(state, tmp_path / "last.pt")
    _remove_sources_and_refuse_initialisations(monkeypatch, bert, dino)
    loaded = ckpt.load_model(tmp_path / "last.pt")
    assert loaded.tokenizer.cls_token == "[CLS]"
    texts = ["a photo of a dog", "a cat"]
    torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts))
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.encode_image(image).embedding, model.encode_image(image).embedding)


def test_a_run_from_pretrained_weights_checkpoints_what_stage_2_and_loading_rebuild_offline(tmp_path, monkeypatch):
    """`ovseg train` from a local BERT folder and a DINO file records the text encoder's config
    and tokenizer in its checkpoints; with both gone, stage 2 starts from stage 1's checkpoint
    and its own checkpoint loads, neither re-running an initialisation."""
    from typer.testing import CliRunner

    from ovseg.cli.main import app
    from tests.training.conftest import make_contract
    from tests.training.test_model import write_dino_checkpoint

    data = make_contract(tmp_path / "D", n=8)
    bert = _tiny_bert_dir(tmp_path / "tiny-bert")
    dino = tmp_path / "dino.pth"
    write_dino_checkpoint(dino)
    run = tmp_path / "run"
    common = ["train", "--preset", "test", "--no-progress", "--data", str(data), "train.batch_size=4",
              f"model.text_pretrained={bert}", f"model.vision_init={dino}"]
    result = CliRunner().invoke(app, [*common, "--run", str(run / "stage1"), "--stage", "1", "train.stages.1.steps=1"])
    assert result.exit_code == 0, result.output
    state = ckpt.load(run / "stage1" / "last.pt")
    assert state["config"]["model"]["text_config"]["hidden_size"] == 64
    assert state["tokenizer"] and state["tokenizer_special_tokens"]["mask_token"] == "[MASK]"

    _remove_sources_and_refuse_initialisations(monkeypatch, bert, dino)
    result = CliRunner().invoke(app, [*common, "--run", str(run / "stage2"), "--stage", "2",
                                      "--init", str(run / "stage1" / "last.pt"), "train.stages.2.steps=1"])
    assert result.exit_code == 0, result.output
    model = ckpt.load_model(run / "stage2" / "last.pt")
    assert model.encode_text(["a photo of a dog"]).shape[0] == 1


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_latest_checkpoint_is_passed_over_with_a_warning(tmp_path, caplog):
    for step in (2, 4):
        ckpt.save(_state(step), tmp_path, step)
    _truncate(tmp_path / "ckpt" / "step-00000004.pt")
    with caplog.at_level("WARNING"):
        assert ckpt.latest(tmp_path).name == "step-00000002.pt"
    assert "step-00000004.pt is damaged" in caplog.text


def test_loading_a_damaged_checkpoint_names_the_file_in_one_line(tmp_path):
    import pytest

    ckpt.save(_state(2), tmp_path, 2)
    _truncate(tmp_path / "ckpt" / "step-00000002.pt")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load(tmp_path / "last.pt")
    assert "step-00000002.pt" in str(error.value) and "\n" not in str(error.value)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="notes.pt"):
        ckpt.load_model(garbage)

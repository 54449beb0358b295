"""Checkpoint converters: the restricted reader runs nothing from a file; official OVSegmentor
and GroupViT state dicts (built here from tiny configs with the official key names) convert and
load; a small random transformers GroupViT, converted, gives transformers' own outputs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ovseg.training.convert.unpickle import Opaque, plain, read_checkpoint  # noqa: E402

torch.set_num_threads(1)


# -- reading a file runs nothing from it -------------------------------------------------------

class _Payload:
    """Pickles as a call of os.system: a plain pickle.load would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_reading_a_checkpoint_never_runs_code_from_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "payload": _Payload(f"touch {marker}")}, path)
    # the same file through plain unpickling would run it: the test's payload is live
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    state = read_checkpoint(path)
    assert not marker.exists()
    assert isinstance(state["payload"], Opaque) and state["payload"].args == (f"touch {marker}",)
    assert torch.equal(state["model"]["w"], torch.ones(2))


def _fake_omegaconf():
    """Classes that pickle as omegaconf's do (module omegaconf.dictconfig, state with _content,
    nodes with _val), registered only while the file is written: the reader has no omegaconf."""
    dictconfig = types.ModuleType("omegaconf.dictconfig")
    nodes = types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content):
            self.__dict__.update(_metadata=object.__new__(AnyNode), _parent=None, _content=content)

    class AnyNode:
        def __init__(self, value):
            self.__dict__.update(_val=value, _metadata=None, _parent=None)

    DictConfig.__module__, AnyNode.__module__ = dictconfig.__name__, nodes.__name__
    DictConfig.__qualname__, AnyNode.__qualname__ = "DictConfig", "AnyNode"
    dictconfig.DictConfig, nodes.AnyNode = DictConfig, AnyNode
    package = types.ModuleType("omegaconf")
    package.dictconfig, package.nodes = dictconfig, nodes
    return {"omegaconf": package, dictconfig.__name__: dictconfig, nodes.__name__: nodes}, DictConfig, AnyNode


def test_an_omegaconf_config_is_read_as_plain_values(tmp_path, monkeypatch):
    modules, DictConfig, AnyNode = _fake_omegaconf()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    config = DictConfig({"model": DictConfig({"use_entityloss": AnyNode(True), "img_encoder": DictConfig(
        {"num_heads": [AnyNode(8), AnyNode(8)], "embed_dim": AnyNode(768)})}),
        "data": DictConfig({"use_entity": AnyNode("${model.use_entityloss}")})})
    torch.save({"model": {}, "config": config}, tmp_path / "ckpt.pth")
    for name in modules:
        monkeypatch.delitem(sys.modules, name)
    values = plain(read_checkpoint(tmp_path / "ckpt.pth")["config"])
    assert values == {"model": {"use_entityloss": True, "img_encoder": {"num_heads": [8, 8], "embed_dim": 768}},
                      "data": {"use_entity": True}}


# -- a small random transformers GroupViT, and the official key names built from it ------------

def _tiny_clip_tokenizer():
    """CLIP's BPE tokenizer over a tiny vocabulary (letters; no merges): end-of-text is the
    largest id, as in CLIP's own vocabulary."""
    import string

    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    names = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(names)}, merges=[])


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight away from its initial value (LayerNorms off 1 and 0, group tokens off 0,
    BatchNorm statistics off 0 and 1), so that a tensor mapped to the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _hf_groupvit(depths, group_tokens, output_groups, tokenizer):
    from transformers import GroupViTConfig, GroupViTModel

    # the text transformer's heads are width / 64 in GroupViT's own code (no config names them)
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=128, depths=depths, num_group_tokens=group_tokens,
                  num_output_groups=output_groups, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = GroupViTModel(GroupViTConfig(text_config=text, vision_config=vision, projection_dim=16,
                                         projection_intermediate_dim=24)).eval()
    _randomise(model)
    return model


@pytest.fixture(scope="module")
def hf_groupvit(tmp_path_factory):
    """A random two-stage GroupViT (8 then 4 groups over a 4x4 token grid), saved as a folder."""
    tokenizer = _tiny_clip_tokenizer()
    model = _hf_groupvit([1, 1, 1], [8, 4, 0], [8, 4, 4], tokenizer)
    folder = tmp_path_factory.mktemp("hf") / "tiny-groupvit"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder, tokenizer


def _official_image_encoder(hf_state: dict, patch_norm: bool = True, flat_positions: bool = False) -> dict:
    """transformers' GroupViT vision weights under the official GroupViT module names."""
    v, out = "vision_model.", {}
    out["img_encoder.patch_embed.proj.weight"] = hf_state[v + "embeddings.patch_embeddings.projection.weight"]
    out["img_encoder.patch_embed.proj.bias"] = hf_state[v + "embeddings.patch_embeddings.projection.bias"]
    if patch_norm:
        for kind in ("weight", "bias"):
            out[f"img_encoder.patch_embed.norm.{kind}"] = hf_state[f"{v}embeddings.layernorm.{kind}"]
    positions = hf_state[v + "embeddings.position_embeddings"]
    out["img_encoder.pos_embed"] = positions[0] if flat_positions else positions
    for key, value in hf_state.items():
        if not key.startswith(v + "encoder.stages."):
            continue
        rest = key[len(v + "encoder.stages."):]
        s, part = rest.split(".", 1)
        if part.startswith("layers."):
            _, j, name = part.split(".", 2)
            name = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj"}.get(
                name.rsplit(".", 1)[0], name.rsplit(".", 1)[0]) + "." + name.rsplit(".", 1)[1]
            if "self_attn.q_proj" in name:
                kind = name.rsplit(".", 1)[1]
                name = f"attn.qkv.{kind}"
                value = torch.cat([hf_state[f"{v}encoder.stages.{s}.layers.{j}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            elif "self_attn." in name:
                continue
            out[f"img_encoder.layers.{s}.blocks.{j}.{name}"] = value
        else:  # group_token, group_projector.*, downsample.*: the official names but one
            out[f"img_encoder.layers.{s}.{part.replace('pre_assign_attn.attn.out_proj', 'pre_assign_attn.attn.proj')}"] = value
    for kind in ("weight", "bias"):
        out[f"img_encoder.norm.{kind}"] = hf_state[f"{v}layernorm.{kind}"]
    return out


def _official_projector(hf_state: dict, src: str, dst: str) -> dict:
    out = {}
    for kind in ("weight", "bias"):
        w0, w3 = hf_state[f"{src}0.{kind}"], hf_state[f"{src}3.{kind}"]
        out[f"{dst}linear_hidden.0.{kind}"] = w0[..., None] if kind == "weight" else w0  # Conv1d, kernel 1
        out[f"{dst}linear_out.{kind}"] = w3[..., None] if kind == "weight" else w3
    for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        out[f"{dst}linear_hidden.1.{part}"] = hf_state[f"{src}1.{part}"]
    return out


def _official_groupvit(hf) -> dict:
    """An official GroupViT state dict (its key names and shapes) holding the weights of `hf`."""
    w = hf.state_dict()
    out = _official_image_encoder(w)
    t, dst = "text_model.", "text_encoder."
    out[dst + "token_embedding.weight"] = w[t + "embeddings.token_embedding.weight"]
    out[dst + "positional_embedding"] = w[t + "embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"{dst}ln_final.{kind}"] = w[f"{t}final_layer_norm.{kind}"]
        for i in range(hf.config.text_config.num_hidden_layers):
            a, b = f"{t}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
            out[f"{b}attn.in_proj_{kind}"] = torch.cat([w[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{b}attn.out_proj.{kind}"] = w[f"{a}self_attn.out_proj.{kind}"]
            for mine, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
                out[f"{b}{mine}.{kind}"] = w[f"{a}{theirs}.{kind}"]
    out.update(_official_projector(w, "visual_projection.", "img_projector."))
    out.update(_official_projector(w, "text_projection.", "text_projector."))
    out["logit_scale"] = w["logit_scale"]
    out["multi_label_logit_scale"] = torch.tensor(2.0)
    return out


def _peer_outputs(hf, images, texts, tokenizer):
    from transformers.models.groupvit.modeling_groupvit import get_grouping_from_attentions

    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=images,
                 output_segmentation=True)
    grid = (images.shape[-2] // 8, images.shape[-1] // 8)
    return ref, get_grouping_from_attentions(ref.vision_model_output.attentions, grid)


def _assert_same_outputs(model, hf, tokenizer):
    """The converted model's embeddings, composed group assignment and segmentation logits
    against transformers' GroupViTModel, to 1e-4."""
    import torch.nn.functional as F

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a photo of a cat", "a dog", "grass and sky"]
    ref, grouping = _peer_outputs(hf, images, texts, tokenizer)
    with torch.no_grad():
        image = model.encode_image(images)
        text = model.encode_text(texts)
        scale = model.scale()
    close = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(image.embedding, ref.image_embeds, **close)
    torch.testing.assert_close(text, ref.text_embeds, **close)
    assert image.assignment.shape == (2, 4, 4, 4)  # (B, K, h, w): 4 groups after both stages, 4x4 tokens
    torch.testing.assert_close(image.assignment, grouping, **close)
    # segmentation logits as transformers forms them: group-to-text logits spread by the assignment
    per_group = image.group_embeddings @ text.T * scale  # (B, K, T)
    maps = F.interpolate(image.assignment, size=images.shape[-2:], mode="bilinear", align_corners=False)
    seg = torch.einsum("bkt,bkhw->bthw", per_group, maps) * scale
    torch.testing.assert_close(seg, ref.segmentation_logits, **close)


@pytest.fixture(scope="module")
def converted_hf(hf_groupvit, tmp_path_factory):
    """`ovseg convert hf-groupvit` of the random transformers GroupViT folder."""
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    out = tmp_path_factory.mktemp("converted") / "groupvit.pt"
    result = CliRunner().invoke(app, ["convert", "hf-groupvit", str(hf_groupvit[1]), str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_converted_transformers_groupvit_gives_transformers_outputs(hf_groupvit, converted_hf):
    from ovseg.training.checkpoint import load_model

    hf, folder, tokenizer = hf_groupvit
    summary = torch.load(converted_hf, weights_only=True)["converted_from"]
    assert summary["left_out"] == [] and summary["left_at_init"] == ["grounding_bias", "grounding_scale"]
    model = load_model(converted_hf)
    assert model.tokenizer(["a cat"])["input_ids"] == tokenizer(["a cat"])["input_ids"]
    _assert_same_outputs(model, hf, tokenizer)


def test_a_converted_checkpoint_segments_images_with_no_source_folder(hf_groupvit, converted_hf, tmp_path,
                                                                      monkeypatch):
    """OUT carries its tokenizer and text config: `ovseg segment` reads no transformers folder
    (nor the network)."""
    import shutil

    import numpy as np
    import transformers
    from PIL import Image
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    def refuse(*args, **kwargs):
        raise AssertionError("segmenting a converted checkpoint read a pretrained folder or name")

    for name in ("AutoTokenizer", "AutoModel", "CLIPTextModel", "BertModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)

    moved = tmp_path / "elsewhere.pt"
    shutil.copy(converted_hf, moved)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    result = CliRunner().invoke(app, ["segment", str(image), "--checkpoint", str(moved), "--vocab", "cat,dog,sky",
                                      "-o", str(tmp_path / "seg"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "seg").iterdir())


@pytest.mark.parametrize("with_config", [True, False], ids=["checkpoint", "state-dict-alone"])
def test_an_official_groupvit_checkpoint_converts_to_the_same_model(hf_groupvit, tmp_path, with_config):
    """GroupViT's own key names and layout (fused qkv, Conv1d projectors, nn.MultiheadAttention
    text blocks), built from the transformers model, convert to a model with its outputs."""
    from ovseg.training.checkpoint import load_model
    from ovseg.training.convert.official import convert_groupvit

    hf, folder, tokenizer = hf_groupvit
    state = _official_groupvit(hf)
    src = tmp_path / "groupvit.pth"
    config = {"model": {"img_encoder": {"num_heads": [2, 2, 2]}}}  # the file's config gives the heads
    torch.save({"model": state, "config": config, "epoch": 29} if with_config else state, src)
    summary = convert_groupvit(src, tmp_path / "out.pt", tokenizer=str(folder))
    assert summary["left_out"] == []
    assert summary["left_at_init"] == ["grounding_bias", "grounding_scale"]  # ovseg's own, unused here
    model = load_model(tmp_path / "out.pt")
    if with_config:
        _assert_same_outputs(model, hf, tokenizer)
    else:  # heads show in no shape: width / 64, here 1 (transformers' model has 2)
        assert model.image_encoder.blocks_before[0].attn.num_heads == 1


# -- official OVSegmentor checkpoints -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random BERT (hidden 64: one head, as hidden / 64 gives) and its tokenizer folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "grass", "and", "sky"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                intermediate_size=128)).eval()  # with its pooler, as the official files hold it
    _randomise(bert, seed=2)
    return bert, folder


def _official_ovsegmentor(hf, bert, patch_norm: bool, flat_positions: bool) -> dict:
    """An official OVSegmentor state dict (its key names and shapes): the image side from a
    two-stage transformers GroupViT, BERT under text_encoder.transformer, Conv1d projectors, and
    the parts a converted model does without (momentum encoder, entity head, mask temperature)."""
    w = hf.state_dict()
    out = _official_image_encoder(w, patch_norm=patch_norm, flat_positions=flat_positions)
    out.update({"text_encoder.transformer." + k: v for k, v in bert.state_dict().items()})
    out["text_encoder.transformer.embeddings.position_ids"] = torch.arange(512)[None]  # older transformers kept it
    out.update(_official_projector(w, "visual_projection.", "img_projector."))
    g = torch.Generator().manual_seed(3)
    hidden, width = w["visual_projection.0.weight"].shape
    out.update({"text_projector.linear_hidden.0.weight": 0.1 * torch.randn(hidden, 64, 1, generator=g),
                "text_projector.linear_hidden.0.bias": 0.1 * torch.randn(hidden, generator=g),
                "text_projector.linear_hidden.1.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
                "text_projector.linear_hidden.1.bias": 0.1 * torch.randn(hidden, generator=g),
                "text_projector.linear_hidden.1.running_mean": 0.1 * torch.randn(hidden, generator=g),
                "text_projector.linear_hidden.1.running_var": 0.5 + torch.rand(hidden, generator=g),
                "text_projector.linear_hidden.1.num_batches_tracked": torch.tensor(100),
                "text_projector.linear_out.weight": 0.1 * torch.randn(16, hidden, 1, generator=g),
                "text_projector.linear_out.bias": 0.1 * torch.randn(16, generator=g),
                "logit_scale": w["logit_scale"], "logit_scale_mask": torch.tensor(2.6)})
    out.update({"img_encoder_momentum." + k[len("img_encoder."):]: v.clone() for k, v in out.items()
                if k.startswith("img_encoder.")})
    out.update(_official_entity_head(g, hidden))
    return out


def _official_entity_head(g: torch.Generator, hidden: int, image: int = 32, text: int = 64) -> dict:
    """OVSegmentor's entity head at the narrower width (the images' 32; BERT's 64 comes down
    through align_proj_text): one MultimodalGroupingBlock and the bridge ProjectMLP."""
    def rand(*shape, base=0.0):
        return base + 0.1 * torch.randn(*shape, generator=g)

    out, b = {}, "multimodal_groupingblock.blocks.0."
    for norm in ("norm_tokens", "norm_x", "norm_new_x", "pre_assign_attn.norm2", "pre_assign_attn.norm_post",
                 "post_attn.norm1", "post_attn.norm2"):
        out[f"{b}{norm}.weight"], out[f"{b}{norm}.bias"] = rand(image, base=1.0), rand(image)
    for name in ("q_proj", "k_proj", "v_proj", "proj"):
        out[f"{b}pre_assign_attn.attn.{name}.weight"], out[f"{b}pre_assign_attn.attn.{name}.bias"] = \
            rand(image, image), rand(image)
        out[f"{b}assign.{name}.weight"], out[f"{b}assign.{name}.bias"] = rand(image, image), rand(image)
    out[f"{b}post_attn.attn.qkv.weight"], out[f"{b}post_attn.attn.qkv.bias"] = rand(3 * image, image), rand(3 * image)
    out[f"{b}post_attn.attn.proj.weight"], out[f"{b}post_attn.attn.proj.bias"] = rand(image, image), rand(image)
    for block in ("pre_assign_attn", "post_attn"):
        out[f"{b}{block}.mlp.fc1.weight"], out[f"{b}{block}.mlp.fc1.bias"] = rand(4 * image, image), rand(4 * image)
        out[f"{b}{block}.mlp.fc2.weight"], out[f"{b}{block}.mlp.fc2.bias"] = rand(image, 4 * image), rand(image)
    out["align_proj_text.weight"], out["align_proj_text.bias"] = rand(image, text), rand(image)
    p = "bridge_projector."
    out.update({p + "linear_hidden.0.weight": rand(hidden, image, 1), p + "linear_hidden.0.bias": rand(hidden),
                p + "linear_hidden.1.weight": rand(hidden, base=1.0), p + "linear_hidden.1.bias": rand(hidden),
                p + "linear_hidden.1.running_mean": rand(hidden), p + "linear_hidden.1.running_var": 1 + rand(hidden).abs(),
                p + "linear_hidden.1.num_batches_tracked": torch.tensor(7),
                p + "linear_out.weight": rand(16, hidden, 1), p + "linear_out.bias": rand(16)})
    return out


def _official_entity_answer(state: dict, question: torch.Tensor, groups: torch.Tensor, heads: int = 8):
    """OVSegmentor's entity head computed here from its tensors, as its code reads: normalised
    question and groups, a post-norm cross-attention, a pre-norm self-attention (the padding
    mask is accepted and not applied), the cross-attended tokens added back, a LayerNorm, the
    first token through the bridge ProjectMLP."""
    import torch.nn.functional as F

    b = "multimodal_groupingblock.blocks.0."

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{b}{name}.weight"], state[f"{b}{name}.bias"])

    def lin(x, name):
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    def attend(q, k, v):
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).flatten(2)

    def mlp(x, block):
        return lin(F.gelu(lin(x, f"{b}{block}.mlp.fc1")), f"{b}{block}.mlp.fc2")

    text = ln(lin(question, "align_proj_text"), "norm_tokens")
    image = ln(groups, "norm_x")
    a = f"{b}pre_assign_attn.attn."
    x = text + lin(attend(lin(text, a + "q_proj"), lin(image, a + "k_proj"), lin(image, a + "v_proj")), a + "proj")
    x = x + mlp(ln(x, "pre_assign_attn.norm2"), "pre_assign_attn")
    crossed = ln(x, "pre_assign_attn.norm_post")
    h = ln(crossed, "post_attn.norm1")
    q, k, v = lin(h, f"{b}post_attn.attn.qkv").chunk(3, dim=-1)
    y = crossed + lin(attend(q, k, v), f"{b}post_attn.attn.proj")
    y = y + mlp(ln(y, "post_attn.norm2"), "post_attn")
    answer = ln(y + crossed, "norm_new_x")[:, 0, :, None]  # (B, C, 1)
    p = "bridge_projector."
    h = F.conv1d(answer, state[p + "linear_hidden.0.weight"], state[p + "linear_hidden.0.bias"])
    h = F.batch_norm(h, state[p + "linear_hidden.1.running_mean"], state[p + "linear_hidden.1.running_var"],
                     state[p + "linear_hidden.1.weight"], state[p + "linear_hidden.1.bias"], eps=1e-5)
    h = F.conv1d(h.relu(), state[p + "linear_out.weight"], state[p + "linear_out.bias"])[..., 0]
    return F.normalize(h, dim=-1)


@pytest.fixture(scope="module")
def hf_one_stage():
    """A random GroupViT with OVSegmentor's layout: one grouping stage (8 tokens into 4 groups)."""
    return _hf_groupvit([1, 1], [8, 0], [4, 4], _tiny_clip_tokenizer())


def _bert_reference(bert, folder, state: dict, texts: list[str]) -> torch.Tensor:
    """The official text embedding computed here: BERT's [CLS] through the Conv1d ProjectMLP."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    p = "text_projector."
    with torch.no_grad():
        cls = bert(**enc).last_hidden_state[:, 0, :, None]  # (B, C, 1)
        h = F.conv1d(cls, state[p + "linear_hidden.0.weight"], state[p + "linear_hidden.0.bias"])
        h = F.batch_norm(h, state[p + "linear_hidden.1.running_mean"], state[p + "linear_hidden.1.running_var"],
                         state[p + "linear_hidden.1.weight"], state[p + "linear_hidden.1.bias"], eps=1e-5)
        h = F.conv1d(h.relu(), state[p + "linear_out.weight"], state[p + "linear_out.bias"])[..., 0]
    return F.normalize(h, dim=-1)


@pytest.mark.parametrize("with_config", [True, False], ids=["checkpoint", "state-dict-alone"])
def test_an_official_ovsegmentor_checkpoint_converts_and_loads(hf_one_stage, tiny_bert, tmp_path, with_config):
    """DINO-initialised form (2-D positions, no patch norm), with the file's config (heads from
    it) or as its state dict alone (heads: the official 8); the text tower gives BERT's [CLS]
    through the official projector; only the entity head is reported as left out."""
    from typer.testing import CliRunner

    from ovseg.cli.main import app
    from ovseg.training.checkpoint import load_model

    bert, folder = tiny_bert
    state = _official_ovsegmentor(hf_one_stage, bert, patch_norm=False, flat_positions=True)
    src, out = tmp_path / "ovsegmentor.pth", tmp_path / "ovsegmentor.pt"
    config = {"model": {"img_encoder": {"num_heads": [2, 2]}, "use_entityloss": True}}
    torch.save({"model": state, "config": config, "optimizer": {}, "epoch": 29} if with_config else state, src)
    result = CliRunner().invoke(app, ["convert", "ovsegmentor", str(src), str(out), "--tokenizer", str(folder)])
    assert result.exit_code == 0, result.output
    saved = torch.load(out, weights_only=True)
    assert saved["converted_from"]["left_out"] == []  # the momentum encoder, pooler, unused assign: skipped
    assert saved["converted_from"]["left_at_init"] == ["grounding_bias", "grounding_scale"]
    model = load_model(out)
    assert model.image_encoder.blocks_before[0].attn.num_heads == (2 if with_config else 8)
    assert not model.cfg.patch_norm and model.image_encoder.pos_embed.shape == (1, 16, 32)
    torch.testing.assert_close(model.image_encoder.pos_embed[0], state["img_encoder.pos_embed"])
    texts = ["a photo of a cat", "a dog", "grass and sky"]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(texts), _bert_reference(bert, folder, state, texts),
                                   atol=1e-4, rtol=0)
        image = model.encode_image(torch.randn(2, 3, 32, 32))
    assert image.group_embeddings.shape == (2, 4, 16) and image.assignment.shape == (2, 4, 4, 4)


def test_an_official_ovsegmentor_image_tower_gives_the_peer_outputs(hf_one_stage, tiny_bert, tmp_path):
    """The OVSegmentor converter's image side (one grouping stage, patch norm present) against
    transformers' GroupViT on the same weights: image embedding and assignment to 1e-4."""
    from ovseg.training.checkpoint import load_model
    from ovseg.training.convert.official import convert_ovsegmentor

    bert, folder = tiny_bert
    src = tmp_path / "ovsegmentor.pth"
    torch.save({"model": _official_ovsegmentor(hf_one_stage, bert, patch_norm=True, flat_positions=False),
                "config": {"model": {"img_encoder": {"num_heads": [2, 2]}}}}, src)
    convert_ovsegmentor(src, tmp_path / "out.pt", tokenizer=str(folder))
    model = load_model(tmp_path / "out.pt")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, grouping = _peer_outputs(hf_one_stage, images, ["a cat"], _tiny_clip_tokenizer())
    with torch.no_grad():
        image = model.encode_image(images)
    torch.testing.assert_close(image.embedding, ref.image_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(image.assignment, grouping, atol=1e-4, rtol=0)


def test_convert_errors_are_one_line_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    runner = CliRunner()
    missing = runner.invoke(app, ["convert", "ovsegmentor", str(tmp_path / "none.pth"), str(tmp_path / "o.pt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    junk = runner.invoke(app, ["convert", "groupvit", str(tmp_path / "junk.pth"), str(tmp_path / "o.pt")])
    assert junk.exit_code == 2 and "not a readable torch checkpoint" in junk.output
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "other.pth")
    other = runner.invoke(app, ["convert", "ovsegmentor", str(tmp_path / "other.pth"), str(tmp_path / "o.pt")])
    assert other.exit_code == 2 and "not an OVSegmentor checkpoint" in other.output
    folder = runner.invoke(app, ["convert", "hf-groupvit", str(tmp_path), str(tmp_path / "o.pt")])
    assert folder.exit_code == 2 and "no config.json" in folder.output
    assert not (tmp_path / "o.pt").exists()
    for command in ("ovsegmentor", "groupvit", "hf-groupvit"):
        help_text = runner.invoke(app, ["convert", command, "--help"]).output
        assert "--tokenizer" in help_text and "OUT" in help_text


def test_the_official_entity_head_converts_onto_the_official_decoder(hf_one_stage, tiny_bert, tmp_path):
    """`--init` from a converted stage-1 file continues its entity head: the converted decoder
    answers as the official head computed here from the same tensors."""
    from ovseg.training.checkpoint import load_model
    from ovseg.training.convert.official import convert_ovsegmentor

    bert, folder = tiny_bert
    state = _official_ovsegmentor(hf_one_stage, bert, patch_norm=False, flat_positions=True)
    torch.save({"model": state}, tmp_path / "stage1.pth")
    convert_ovsegmentor(tmp_path / "stage1.pth", tmp_path / "out.pt", tokenizer=str(folder))
    model = load_model(tmp_path / "out.pt")
    assert model.cfg.decoder == "official" and model.cfg.losses == ["contrastive", "entity"]
    g = torch.Generator().manual_seed(5)
    question, groups = torch.randn(2, 6, 64, generator=g), torch.randn(2, 4, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        answer = model.entity_decoder(question, mask, groups)
    torch.testing.assert_close(answer, _official_entity_answer(state, question, groups), atol=1e-4, rtol=0)


def test_stage_2_continues_from_a_converted_official_checkpoint(hf_one_stage, tiny_bert, tmp_path):
    """`ovseg train --stage 2 --init OUT` on the converted file's architecture: every tensor of
    OUT is taken (the frozen text encoder comes out of stage 2 unchanged) and it trains."""
    from typer.testing import CliRunner

    from ovseg.cli.main import app
    from ovseg.training.convert.official import convert_ovsegmentor
    from tests.training.conftest import make_contract

    bert, folder = tiny_bert
    torch.save({"model": _official_ovsegmentor(hf_one_stage, bert, patch_norm=False, flat_positions=True),
                "config": {"model": {"img_encoder": {"num_heads": [2, 2]}}}}, tmp_path / "stage1.pth")
    convert_ovsegmentor(tmp_path / "stage1.pth", tmp_path / "ovsegmentor.pt", tokenizer=str(folder))
    data = make_contract(tmp_path / "D", n=8)
    result = CliRunner().invoke(app, [
        "train", "--preset", "test", "--no-progress", "--data", str(data), "--run", str(tmp_path / "run"),
        "--stage", "2", "--init", str(tmp_path / "ovsegmentor.pt"), "train.stages.2.steps=1",
        f"model.text_pretrained={folder}", "model.embed_dim=16", "model.proj_hidden=24", "model.decoder=official",
        "model.decoder_heads=8", "model.decoder_padding_mask=false"])
    assert result.exit_code == 0, result.output
    converted = torch.load(tmp_path / "ovsegmentor.pt", weights_only=True)["model"]
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert set(converted) <= set(trained)
    text = [k for k in converted if k.startswith("text_encoder.")]
    assert text and all(torch.equal(converted[k], trained[k]) for k in text)
    assert not torch.equal(converted["entity_decoder.layers.0.norm_out.weight"],
                           trained["entity_decoder.layers.0.norm_out.weight"])

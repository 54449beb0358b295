"""Gradient caching (training/gradcache.py) gives the gradient of one batch k times the size,
for every parameter, in one process and in two (gloo); plain accumulation does not. Per-sample
noise (training/model/noise.py) makes a sample's Gumbel, dropout and drop path noise its own,
whatever batch, row or padding it comes in."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ovseg.training import gradcache  # noqa: E402
from ovseg.training.model import build_model, noise  # noqa: E402
from ovseg.training.tokenizer import train_wordpiece  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_model import CAPTIONS, make_batch, tiny_config  # noqa: E402

torch.set_num_threads(1)

STEP_SEED = 5
PAPER_LOSSES = ["contrastive", "entity", "mask"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(CAPTIONS, vocab_size=200, min_frequency=1)


def big_batch(tokenizer, n: int = 16, pairs_in_batch: bool = False) -> dict:
    """n rows (the 4 captions of make_batch repeated: entities recur across micro-batches),
    float64 images. `pairs_in_batch`: the partners are rows of the batch (the first 10 rows are
    samples, the last 6 the partners of samples 0..5), else a partner image per row."""
    parts = [make_batch(tokenizer) for _ in range(n // 4)]
    batch = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    g = torch.Generator().manual_seed(1)
    batch["image"] = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    batch["partner_image"] = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    batch["sample_id"] = torch.arange(n) * 7 + 3
    if pairs_in_batch:
        del batch["partner_image"]
        samples = n - 6
        index = torch.full((n,), -1)
        index[:6], index[samples:] = torch.arange(samples, n), torch.arange(6)
        batch["partner_index"], batch["has_partner"] = index, index >= 0
    return batch


def noisy_model(tokenizer, **changes) -> nn.Module:
    """The `test` preset in float64 with noise on: BERT dropout (text_dropout 0.1, hidden and
    attention), drop path 0.1, hard Gumbel assignment in training mode."""
    torch.manual_seed(0)
    cfg = tiny_config(drop_path=0.1, text_dropout=0.1, **changes)
    return build_model(cfg, tokenizer=tokenizer).double().train()


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in model.named_parameters() if p.requires_grad}


def full_batch(model, batch) -> tuple[dict, dict]:
    model.zero_grad()
    with noise.per_sample(noise.batch_seeds(batch, STEP_SEED), STEP_SEED):
        losses = model(batch)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}, gradients(model)


def cached(model, batch, k: int) -> tuple[dict, dict]:
    model.zero_grad()
    losses = gradcache.cached_step(model, gradcache.split_batch(batch, k), STEP_SEED)
    return losses, gradients(model)


def plain_accumulation(model, batch, k: int) -> dict:
    model.zero_grad()
    for micro in gradcache.split_batch(batch, k):
        with noise.per_sample(noise.batch_seeds(micro, STEP_SEED), STEP_SEED):
            (model(micro)["loss"] / k).backward()
    return gradients(model)


# Some gradients are zero by construction and come out as rounding noise: the projectors' batch
# norm removes any shift shared by every row (the encoder's last LayerNorm bias), the softmax over
# the groups any logit shared by every group (the assignment's query bias), and the Gumbel softmax
# runs in float32 even in a float64 model. Each parameter's error is measured against its own
# gradient norm, or against 1e-5 of the median parameter's where its own is smaller.
FLOOR = 1e-5


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    norms = sorted(float(g.norm()) for g in want.values())
    floor = FLOOR * norms[len(norms) // 2]
    return {name: float((got[name] - want[name]).norm()) / max(float(want[name].norm()), floor) for name in want}


def reached(grads: dict) -> int:
    norms = sorted(float(g.norm()) for g in grads.values())
    return sum(n > FLOOR * norms[len(norms) // 2] for n in norms)


# -- one process --------------------------------------------------------------------------------

@pytest.mark.parametrize("losses, pairs_in_batch, changes", [
    (PAPER_LOSSES, False, {}),  # the paper's three losses, a partner image per row
    (PAPER_LOSSES, False, {"mask_form": "official", "decoder": "official"}),  # the paper preset's forms
    (PAPER_LOSSES + ["grounding"], True, {"mask_form": "official"}),  # partners in the batch, momentum teacher
    (PAPER_LOSSES + ["grounding"], True, {"momentum": 0.0}),  # the image encoder as its own teacher
], ids=["partner-image", "official-partner-image", "official-pairs-in-batch", "no-momentum-pairs-in-batch"])
def test_cached_gradients_of_every_parameter_equal_one_batch_four_times_the_size(tokenizer, losses, pairs_in_batch,
                                                                                 changes):
    model = noisy_model(tokenizer, losses=losses, **changes)
    batch = big_batch(tokenizer, pairs_in_batch=pairs_in_batch)
    want_losses, want = full_batch(model, batch)
    got_losses, got = cached(model, batch, k=4)
    # the step's losses over the whole step, not its last micro-batch (to float32 rounding: the
    # official mask loss and the grounding loss compute in float32; a pairs batch is reordered)
    for name in want_losses:
        torch.testing.assert_close(got_losses[name], want_losses[name], rtol=1e-6, atol=1e-9)
    errors = relative_errors(got, want)
    assert reached(want) > 0.9 * len(want)  # nearly every parameter has a gradient to compare
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda item: item[1])
    # plain accumulation (each micro-batch its own negatives, batch norm and means) is not it
    plain = relative_errors(plain_accumulation(model, batch, k=4), want)
    assert max(plain.values()) > 0.1
    assert sorted(plain.values())[len(plain) // 2] > 1e-3  # and not for a few parameters only


def test_uneven_micro_batches_and_a_loss_scaler_give_the_scaled_gradient_of_the_whole_batch(tokenizer):
    class Scaler:  # what cached_step asks of a GradScaler
        def scale(self, loss):
            return loss * 8.0

    model = noisy_model(tokenizer, losses=PAPER_LOSSES)
    batch = big_batch(tokenizer)
    _, want = full_batch(model, batch)
    micro = gradcache.split_batch(batch, 3)
    assert [m["image"].shape[0] for m in micro] == [6, 5, 5]
    model.zero_grad()
    gradcache.cached_step(model, micro, STEP_SEED, scaler=Scaler())
    errors = relative_errors({k: v / 8.0 for k, v in gradients(model).items()}, want)
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda item: item[1])


def test_noise_is_on_in_the_comparison_so_it_cannot_pass_by_chance(tokenizer):
    """Another step seed (other Gumbel, dropout and drop-path noise) moves the loss: the
    cached run matches the full batch because both see the same per-sample noise."""
    model = noisy_model(tokenizer, losses=PAPER_LOSSES)
    batch = big_batch(tokenizer)
    losses = []
    for seed in (STEP_SEED, STEP_SEED + 1):
        with torch.no_grad(), noise.per_sample(noise.batch_seeds(batch, seed), seed):
            losses.append(model(batch)["loss"].item())
    assert abs(losses[0] - losses[1]) > 1e-4


def test_split_batch_keeps_each_sample_with_its_partner_and_every_row_once(tokenizer):
    batch = big_batch(tokenizer, pairs_in_batch=True)
    micro = gradcache.split_batch(batch, 4)
    seen = torch.cat([m["sample_id"] for m in micro])
    assert sorted(seen.tolist()) == sorted(batch["sample_id"].tolist())
    ids = batch["sample_id"].tolist()
    for m in micro:
        for row, partner in enumerate(m["partner_index"].tolist()):
            if partner >= 0:  # the same pair as in the whole batch, within the micro-batch
                assert m["partner_index"][partner] == row
                whole_row, whole_partner = ids.index(int(m["sample_id"][row])), ids.index(int(m["sample_id"][partner]))
                assert batch["partner_index"][whole_row] == whole_partner
    with pytest.raises(ValueError, match="cannot split"):
        gradcache.split_batch(batch, 17)


# -- two processes (gloo) -------------------------------------------------------------------------

def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ovseg.training.distributed import all_reduce_mean, average_gradients
    from ovseg.training.model.projector import set_sync_stats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tokenizer = train_wordpiece(CAPTIONS, vocab_size=200, min_frequency=1)
    model = noisy_model(tokenizer, losses=PAPER_LOSSES)
    batch = big_batch(tokenizer)
    per = batch["image"].shape[0] // world
    local = gradcache.split_batch(batch, world)[rank]  # this rank's half, rows rank * per ...
    assert int(local["sample_id"][0]) == int(batch["sample_id"][rank * per])
    results = {}
    # the projectors' batch norm over both ranks' rows (the official SyncBN): two ranks with two
    # cached micro-batches each, the training step's way (the bare model under the DDP
    # wrapper's no_sync, gradients averaged by hand), must equal one process with the batch
    set_sync_stats(model, True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with ddp.no_sync():
        losses, _ = cached(ddp.module, local, k=2)
    average_gradients(model.parameters())
    results["synced_cached"] = ({k: all_reduce_mean(v) for k, v in losses.items()}, gradients(model))
    results["running"] = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    full_batch(model, local)  # and so must two ranks holding their halves as one batch each
    average_gradients(model.parameters())
    results["synced_full"] = gradients(model)
    # batch norm over each rank's rows (as DDP without SyncBN): caching equals each rank holding
    # its half as one batch
    set_sync_stats(model, False)
    cached(model, local, k=2)
    average_gradients(model.parameters())
    results["rank_norm_cached"] = gradients(model)
    full_batch(model, local)
    average_gradients(model.parameters())
    results["rank_norm_full"] = gradients(model)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's shutdown after the results are written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_with_two_cached_micro_batches_each_equal_one_process_with_the_whole_batch(tokenizer, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=False)
    model = noisy_model(tokenizer, losses=PAPER_LOSSES)
    want_losses, want = full_batch(model, big_batch(tokenizer))
    got_losses, got = results["synced_cached"]
    for name in want_losses:
        torch.testing.assert_close(got_losses[name], want_losses[name], rtol=1e-9, atol=1e-12)
    for key, want_grads in (("synced_cached", want), ("synced_full", want),
                            ("rank_norm_cached", results["rank_norm_full"])):
        got = results[key][1] if key == "synced_cached" else results[key]
        errors = relative_errors(got, want_grads)
        assert max(errors.values()) < 1e-5, (key, max(errors.items(), key=lambda item: item[1]))
    # the batch norms' running statistics moved once, as by one batch of every rank's rows
    running = {k: v for k, v in model.state_dict().items() if "running_" in k and "momentum_encoder" not in k}
    assert running and all(torch.allclose(results["running"][k], v, rtol=1e-9, atol=1e-12) for k, v in running.items())
    # per-rank batch norm is not one process's: the synced statistics are what makes them equal
    assert max(relative_errors(results["rank_norm_full"], want).values()) > 1e-3


# -- per-sample noise -------------------------------------------------------------------------------

def test_a_samples_noise_is_the_same_in_a_batch_of_two_or_eight_at_any_row(tokenizer):
    model = noisy_model(tokenizer, losses=PAPER_LOSSES)
    batch = big_batch(tokenizer, n=8)
    rows = torch.tensor([5, 2])  # a batch of 2: rows 5 and 2 of the 8, now at rows 0 and 1
    small = {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (8,) else v for k, v in batch.items()}
    with torch.no_grad():
        with noise.per_sample(noise.batch_seeds(batch, STEP_SEED), STEP_SEED):
            big = model.embed(batch)
        with noise.per_sample(noise.batch_seeds(small, STEP_SEED), STEP_SEED):
            few = model.embed(small)
        again = model.embed(small)  # no context: the global RNG, other noise
    for key in ("groups", "caption", "answer", "decoded", "student", "teacher"):
        torch.testing.assert_close(few[key], big[key][rows], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(again["groups"], few["groups"])  # the noise is really there


def test_seeded_noise_keeps_an_elements_value_when_other_dimensions_grow():
    seeds = torch.tensor([11, 12, 13])
    with noise.per_sample(seeds):
        a = noise.uniform((3, 2, 5, 5), salt=7)
        b = noise.uniform((3, 2, 9, 9), salt=7)  # longer (padded) text: attention weights (B, h, L, L)
        other_salt = noise.uniform((3, 2, 5, 5), salt=8)
    with noise.per_sample(seeds[[2, 0]]):
        swapped = noise.uniform((2, 2, 5, 5), salt=7)
    torch.testing.assert_close(b[:, :, :5, :5], a, rtol=0, atol=0)
    torch.testing.assert_close(swapped, a[[2, 0]], rtol=0, atol=0)
    assert not torch.equal(a, other_salt)
    with noise.per_sample(torch.arange(4)):
        u = noise.uniform((4, 100_000), salt=3)
    assert 0 < float(u.min()) and float(u.max()) < 1
    ids = {"sample_id": torch.arange(4)}  # every bit of the step seed counts, and every sample its own
    assert not torch.equal(noise.batch_seeds(ids, 5), noise.batch_seeds(ids, 5 + 2 ** 32))
    assert noise.batch_seeds(ids, 5).unique().numel() == 4
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12 ** -0.5) < 0.005


@pytest.mark.parametrize("arch", ["bert", "clip"])
def test_text_dropout_of_a_caption_does_not_depend_on_the_batchs_padding(tokenizer, arch):
    """The text encoder's dropout (BERT's hidden and attention dropout; CLIP's attention
    dropout, causal), per sample: the same caption padded to 16 or to 24 tokens gets the same
    features on its real tokens."""
    model = noisy_model(tokenizer, losses=["contrastive"], text_arch=arch)
    ids = {n: tokenizer(["a dog and a person"], padding="max_length", max_length=n, return_tensors="pt")
           for n in (16, 24)}
    with torch.no_grad(), noise.per_sample(torch.tensor([42])):
        short = model.text_features(ids[16]["input_ids"], ids[16]["attention_mask"])
        long = model.text_features(ids[24]["input_ids"], ids[24]["attention_mask"])
        other = model.text_features(ids[16]["input_ids"], ids[16]["attention_mask"])
    with noise.per_sample(torch.tensor([43])), torch.no_grad():
        another_seed = model.text_features(ids[16]["input_ids"], ids[16]["attention_mask"])
    real = ids[16]["attention_mask"][0].bool()
    torch.testing.assert_close(long[:, :16][:, real], short[:, real], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(other, short, rtol=0, atol=0)
    assert not torch.allclose(another_seed[:, real], short[:, real])


def test_outside_the_context_the_model_draws_from_the_global_rng_as_before(tokenizer):
    model = noisy_model(tokenizer, losses=PAPER_LOSSES)
    batch = big_batch(tokenizer, n=4)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(batch)["loss"]
        torch.manual_seed(3)
        b = model(batch)["loss"]
        c = model(batch)["loss"]
    assert a == b and a != c


def test_per_sample_uniforms_stay_strictly_inside_0_1_at_the_extreme_hashes():
    """The largest hash once rounded to 1.0 in float32, and its Gumbel noise was infinite (a
    synthetic-paper run went NaN at step 42)."""
    extremes = torch.tensor([0, 1, 511, 512, 0xFFFFFE00, 0xFFFFFFFF], dtype=torch.int64)
    u = noise.unit_interval(extremes)
    assert bool(((u > 0) & (u < 1)).all()), u
    assert torch.isfinite(-(-u.log()).log()).all()  # Gumbel noise
    assert u[-1] < 1 and u[0] > 0 and u.dtype == torch.float32

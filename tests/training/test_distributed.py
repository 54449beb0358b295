"""Process helpers: world size 1 without torchrun, and two real gloo processes agreeing."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from ovseg.training import distributed as dist_utils


def test_without_torchrun_the_process_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist_utils.setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu") and not dist_utils.launched_by_torchrun()
    assert dist_utils.all_reduce_mean(torch.tensor(3.0)).item() == 3.0
    assert dist_utils.any_rank(True, info.device)


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = dist_utils.setup("cpu")
    try:
        mean = dist_utils.all_reduce_mean(torch.tensor(float(rank)))
        stop = dist_utils.any_rank(rank == 1, info.device)  # only rank 1 was signalled
        each = dist_utils.any_rank_each([rank == 0, False], info.device)
        out[rank] = (info.world_size, info.is_main, mean.item(), stop, each)
    finally:
        dist_utils.teardown()


@pytest.mark.slow
def test_two_gloo_processes_average_and_share_a_stop_request():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(29547, out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == (2, True, 0.5, True, [True, False])
    assert results[1] == (2, False, 0.5, True, [True, False])

"""One rank of the two-process contrastive-loss check in test_losses.py (run as a script: a
real gloo process group on 127.0.0.1). Usage: python gloo_contrastive_worker.py RANK WORLD PORT OUT"""

import os
import sys

import torch
import torch.distributed as dist

from ovseg.training.losses.contrastive import contrastive_loss


def problem(seed: int = 0, n: int = 8, d_in: int = 6, d: int = 4):
    """The same inputs and weights on every rank: n image/text feature rows, two linear maps,
    a validity mask with one invalid row on each half."""
    g = torch.Generator().manual_seed(seed)
    x_img, x_txt = torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)
    w_img, w_txt = torch.randn(d_in, d, generator=g), torch.randn(d_in, d, generator=g)
    valid = torch.ones(n, dtype=torch.bool)
    valid[[1, n - 2, n - 1]] = False
    return x_img, x_txt, w_img, w_txt, valid


def loss_and_grads(x_img, x_txt, w_img, w_txt, valid=None):
    w_img, w_txt = w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    a = torch.nn.functional.normalize(x_img @ w_img, dim=-1)
    b = torch.nn.functional.normalize(x_txt @ w_txt, dim=-1)
    loss = contrastive_loss(a, b, scale, valid=valid)
    loss.backward()
    return loss.detach(), [w_img.grad, w_txt.grad, scale.grad]


def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x_img, x_txt, w_img, w_txt, valid = problem()
    per = x_img.shape[0] // world
    rows = slice(rank * per, (rank + 1) * per)
    results = {}
    for name, mask in (("all", None), ("valid", valid[rows])):
        loss, grads = loss_and_grads(x_img[rows], x_txt[rows], w_img, w_txt, mask)
        for t in [loss, *grads]:  # what DDP does: average over ranks
            dist.all_reduce(t)
            t /= world
        results[name] = (loss, grads)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()
    # gloo's threads can still abort the interpreter's own shutdown ("terminate called without an
    # active exception", about 1 run in 6 on a loaded 2-core machine) after the results are
    # written: leave without it
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

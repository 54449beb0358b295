"""How a stage's global batch is split: processes x micro-batches x micro-batch size, and the
largest micro-batch that fits the accelerator's memory.

A stage that sets `global_batch` (the `paper` preset: the official 2,048 and 1,024) trains
that batch on whatever processes there are: each process takes global_batch / world samples
per optimiser step, in micro-batches of `optim.micro_batch` samples, or of the largest size
that a short probe finds to fit. With more than one micro-batch per step, the contrastive
loss sees the whole step's negatives only with `optim.contrastive_cache` (docs/training.md).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# a micro-batch fits when the probe's peak stays under this share of the device's memory:
# the rest is the optimiser's first step (its state), the cached embeddings, and fragmentation
HEADROOM = 0.85


class BatchError(ValueError):
    """A global batch that the processes and micro-batches cannot split."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    processes: int
    micro_batch: int  # samples per forward pass on each process
    accum_steps: int  # micro-batches per optimiser step on each process
    how: str  # how the micro-batch was chosen, for the log

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.processes} processes x {self.accum_steps} micro-batches "
                f"x {self.micro_batch} ({self.how})")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(global_batch: int, processes: int, micro_batch: int | None = None,
               fits: Callable[[int], bool] | None = None, key: str = "global_batch") -> BatchPlan:
    """Split `global_batch` over `processes`. The micro-batch is `micro_batch` when given,
    else the largest divisor of the per-process batch for which `fits(size)` holds (a
    binary search: memory grows with the size), else, with no probe (`fits` None, a CPU), the
    per-process batch itself."""
    if global_batch < 1 or global_batch % processes:
        raise BatchError(f"{key} {global_batch} does not split over {processes} processes: "
                         f"give a multiple of {processes}")
    per_process = global_batch // processes
    if micro_batch is not None:
        if micro_batch < 1 or per_process % micro_batch:
            raise BatchError(f"optim.micro_batch {micro_batch} does not divide the {per_process} samples "
                             f"per process of {key} {global_batch}")
        return BatchPlan(global_batch, processes, micro_batch, per_process // micro_batch, "set by optim.micro_batch")
    if fits is None:
        return BatchPlan(global_batch, processes, per_process, 1, "no memory probe off CUDA: one micro-batch")
    sizes = _divisors(per_process)
    low, high, best = 0, len(sizes) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            best, low = sizes[middle], middle + 1
        else:
            high = middle - 1
    if best is None:
        raise BatchError(f"not even a micro-batch of 1 fits this device's memory for {key} {global_batch}")
    tried = "the largest that fits" if best == per_process else f"the largest that fits; {sizes[sizes.index(best) + 1]} did not"
    return BatchPlan(global_batch, processes, best, per_process // best, f"memory probe: {tried}")


def cuda_fits(model: torch.nn.Module, batch_of: Callable[[int], dict[str, Any]], use_bf16: bool,
              agree: Callable[[bool], bool] = lambda ok: ok) -> Callable[[int], bool]:
    """A probe for `plan_batch` on CUDA: one forward and backward of a batch of the size (from
    `batch_of`) under the run's autocast; it fits when it neither runs out of memory nor peaks
    above HEADROOM of the device. The model's weights, buffers (batch-norm statistics) and
    gradients are left as they were. `agree` makes every process take the same answer (all
    fit, or none)."""
    device = next(model.parameters()).device
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(size: int) -> bool:
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        ok = True
        try:
            batch = batch_of(size)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
            with autocast:
                loss = model(batch)["loss"]
            loss.backward()
            ok = torch.cuda.max_memory_allocated(device) <= HEADROOM * total
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            batch = loss = None
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            torch.cuda.empty_cache()
        ok = agree(ok)
        log.info("micro-batch probe: %d samples %s", size, "fit" if ok else "did not fit")
        return ok

    return fits

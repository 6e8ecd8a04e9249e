"""Several processes (GPUs) through accelerate: `accelerate launch -m duge.cli unlearn ...`.

Data parallel over the per-step batch. Every process loads the model, builds the same cached
images (same seeds) and draws the same batch (anchor and related latents, prompts, noise and
timesteps) from the same generators; each then runs the UNet on its own contiguous slice of that
batch, scales its losses by its share of the batch, and the gradients of the trainable deltas are
averaged over the processes (one all-reduce in the process group accelerate set up) before every
optimizer step. The
result is the gradient of the whole batch, as in a single process, up to floating-point summation
order. Only the main process writes files.

The deltas are new parameters for every request, so they are reduced explicitly instead of
through a `DistributedDataParallel` wrapper, whose gradient hooks are set up once per module.

Launch: `accelerate launch --multi_gpu --num_processes N -m duge.cli unlearn ...` (on a machine
without CUDA this runs N CPU processes over gloo; accelerate's `--cpu` starts a single process
unless MPI is set up).
With one process every function here is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .errors import DugeError

logger = logging.getLogger(__name__)


def launched_distributed() -> bool:
    """True inside `accelerate launch` (or torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class ProcessInfo:
    rank: int
    world: int
    device: torch.device
    backend: str

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def start() -> ProcessInfo:
    """Join the process group of `accelerate launch` (accelerate's `PartialState` sets it up: NCCL on
    GPUs, gloo without CUDA) and return this process's rank, the number of processes and its device.

    Rank and world size are read from torch.distributed: on a machine without CUDA, `accelerate launch
    --multi_gpu` starts the processes and PartialState joins them to a gloo group while reporting its
    own distributed type as NO, so its `num_processes` says 1 there."""
    from accelerate import PartialState  # deferred: accelerate, only under `accelerate launch`

    state = PartialState()
    rank, world = rank_and_world()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    backend = torch.distributed.get_backend() if world > 1 else "none"
    info = ProcessInfo(rank, world, device if world > 1 else state.device, backend)
    if world > 1:
        logger.info("data parallel: process %d of %d on %s (%s)", rank, world, info.device, backend)
    return info


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def shard_rows(count: int) -> slice:
    """This process's contiguous rows of a batch of `count` (sizes differ by at most one; all rows alone)."""
    rank, world = rank_and_world()
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_weight(rows: slice, count: int) -> float:
    """Factor for a loss averaged over this process's rows so that the average over processes is the
    loss averaged over all `count` rows: rows · world / count."""
    _, world = rank_and_world()
    return (rows.stop - rows.start) * world / count if count else 0.0


def masked_shard_weight(rows: slice, selected) -> float:
    """`shard_weight` for a loss averaged only over the batch rows where `selected` [count] (bool) is
    True: selected rows here · world / selected rows in the whole batch (0 when none is selected)."""
    _, world = rank_and_world()
    total = int(selected.sum())
    return int(selected[rows].sum()) * world / total if total else 0.0


def check_batch(batch_size: int) -> None:
    _, world = rank_and_world()
    if batch_size < world:
        raise DugeError(f"batch_size {batch_size} is smaller than the number of processes ({world}); "
                        "every process needs at least one anchor sample per step")


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the processes (one all-reduce of a flat buffer)."""
    _, world = rank_and_world()
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()

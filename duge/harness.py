"""The run-time harness around the trainer's steps: accumulation, cancelling and rollback.

- `accumulate` runs this process's rows of a batch (`duge.distributed`) a micro-batch at a time,
  back-propagating each part's loss before the next part runs: the gradients add up to the whole
  batch's while one part's activations are alive at a time.
- `check_cancel` / `interrupt_as_cancel`: a cancel callback or Ctrl-C ends the run with
  `UnlearnCancelled` (the edits are removed on the way out, so the host is unchanged).
- `RequestRollback`: a NaN/inf loss or weight, or an optimiser step that overflows, drops the
  request and restores the committed deltas from before it, raising `TrainingDiverged`.

The memory choice (micro-batch size, gradient checkpointing) is `duge.memory`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

from .distributed import average_gradients, shard_rows
from .errors import DugeError


class UnlearnCancelled(DugeError):
    """The run was cancelled (Ctrl-C or a cancel callback); nothing was produced."""


class TrainingDiverged(DugeError):
    """A loss or weight became NaN/inf; the request was rolled back."""


def check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise UnlearnCancelled("unlearning cancelled; the model was left unchanged and nothing was written")


@contextmanager
def interrupt_as_cancel():
    """Ctrl-C inside becomes `UnlearnCancelled` (raised after the contexts inside have cleaned up)."""
    try:
        yield
    except KeyboardInterrupt as err:
        raise UnlearnCancelled("unlearning interrupted; the model was left unchanged and nothing was written") from err


def micro_batches(rows: slice, size: int) -> list[slice]:
    """`rows` cut into consecutive slices of at most `size` rows (0: one slice)."""
    if size <= 0 or rows.stop - rows.start <= size:
        return [rows]
    return [slice(i, min(i + size, rows.stop)) for i in range(rows.start, rows.stop, size)]


def accumulate(count: int, micro_batch_size: int,
               part_loss: Callable[[slice], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:
    """Back-propagate `part_loss(rows)` for this process's rows of a batch of `count`, `micro_batch_size`
    rows at a time (0: all at once). `part_loss` weights its loss by the part's share of the batch
    (`duge.distributed.shard_weight`) and returns it with the values to report; their sums are returned."""
    values: dict[str, float] = {}
    for part in micro_batches(shard_rows(count), micro_batch_size):
        if part.stop == part.start:
            continue
        loss, part_values = part_loss(part)
        loss.backward()
        for name, value in part_values.items():
            values[name] = values.get(name, 0.0) + value
    return values


class RequestRollback:
    """Guards one request's optimisation: on a NaN/inf loss or weight, or an overflowing optimiser step,
    the request's trainable deltas are dropped and the committed deltas restored to `edits.committed()`
    as it was when the guard was made, and `TrainingDiverged` is raised."""

    def __init__(self, edits, label: str):
        self.edits, self.label, self.before = edits, label, edits.committed()

    def diverged(self, problem: str) -> TrainingDiverged:
        self.edits.discard_request()
        self.edits.load_committed(self.before)
        return TrainingDiverged(f"request '{self.label}': {problem}; the request was rolled back — "
                                "lower the learning rate")

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: float, step: int) -> None:
        """Average the gradients over the processes and step the optimiser, unless something diverged."""
        if not math.isfinite(loss):
            raise self.diverged(f"loss became {loss} at step {step + 1}")
        average_gradients(params)  # over the processes of `accelerate launch`; else nothing
        try:
            optimizer.step()
        except RuntimeError as err:  # AdamW's step size overflows float32 for an absurd learning rate
            if "overflow" not in str(err):
                raise
            lr = optimizer.param_groups[0]["lr"]
            raise self.diverged(f"the optimiser step overflowed at step {step + 1} (learning rate {lr:g})") from err
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise self.diverged(f"a weight became NaN/inf at step {step + 1}")

    def commit(self) -> dict[str, torch.Tensor]:
        """The request's ΔW per layer, committed; rolled back if any of it is NaN/inf."""
        delta = self.edits.commit_request()
        if not all(torch.isfinite(d).all() for d in delta.values()):
            self.edits.load_committed(self.before)
            raise TrainingDiverged(f"request '{self.label}': a weight became NaN/inf; the request was rolled back")
        return delta

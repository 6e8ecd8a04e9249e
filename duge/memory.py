"""The memory a training run takes, chosen when it starts (`UnlearnConfig` "auto" settings).

`RunMemory` settles gradient checkpointing and the micro-batch size once per run, at the first
request that trains: it measures the activations one batch row keeps for the backward pass (one
row through the UNet, counting what autograd saves) and picks with `choose_memory_settings`
against the device's free memory (`free_memory_bytes`) or `memory_budget_gb`. `duge plan` makes
the same choice from planned sizes (`duge.plan`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends.base import Backend
from .concepts import render_prompt
from .config import UnlearnConfig
from .distributed import shard_rows
from .methods import Method
from .targets import predict

logger = logging.getLogger(__name__)

MEMORY_MARGIN = 0.8  # share of the free memory the activations may take (the rest: allocator slack, other users)
# Peak of one row's forward + backward pass over the activations autograd keeps for it: the
# backward's own temporaries (gradients of the activations, a layer at a time). 1.15 was measured
# once by hand, not by a shipped benchmark: a random-weight SD 1.5 UNet at 64x64 latents on the CPU,
# VmHWM around one forward + backward (1.40 GiB kept, 1.60 GiB peak for one row; 1.11 for two).
BACKWARD_PEAK = 1.15


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for this process now: on CUDA the device's free memory plus what PyTorch's caching
    allocator holds unused (reserved, not allocated), on the CPU the kernel's MemAvailable; None when
    it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class MemoryChoice:
    gradient_checkpointing: bool
    micro_batch_size: int  # rows per UNet pass; 0: the whole batch at once
    reason: str


def choose_memory_settings(rows: int, full_bytes_per_row: float, checkpointed_bytes_per_row: float | None,
                           budget_bytes: float | None, gradient_checkpointing="auto",
                           micro_batch_size="auto") -> MemoryChoice:
    """Settle "auto" gradient checkpointing and micro-batch size for a step of `rows` batch rows.

    The activations kept for the backward pass grow with the rows in one UNet pass (`*_bytes_per_row`,
    measured or planned; `checkpointed_bytes_per_row` None: the backend cannot checkpoint), and the
    pass peaks at `BACKWARD_PEAK` times that. Within
    `budget_bytes` (None: unknown, nothing is limited): the whole batch at once if it fits; else
    micro-batches as large as fit (accumulated gradients: the same step, no extra compute); only when
    a single row does not fit, gradient checkpointing (a third more compute) with the largest
    micro-batch that then fits. A setting given as a value is kept as it is.
    """
    def rows_fitting(per_row: float) -> int:
        return int(budget_bytes // (per_row * BACKWARD_PEAK)) if per_row > 0 else rows

    def micro_for(per_row: float) -> int:
        if micro_batch_size != "auto":
            return int(micro_batch_size)
        fit = rows_fitting(per_row)
        return 0 if fit >= rows else max(1, fit)

    gib = 2**30
    if budget_bytes is None:
        ckpt = gradient_checkpointing is True
        return MemoryChoice(ckpt, 0 if micro_batch_size == "auto" else int(micro_batch_size),
                            "free memory unknown: the whole batch at once")
    if gradient_checkpointing != "auto":
        per_row = checkpointed_bytes_per_row if gradient_checkpointing and checkpointed_bytes_per_row else full_bytes_per_row
        micro = micro_for(per_row)
        return MemoryChoice(bool(gradient_checkpointing), micro,
                            f"{per_row / gib:.2f} GiB of activations per row, {budget_bytes / gib:.2f} GiB free for them")
    if rows_fitting(full_bytes_per_row) >= 1 or checkpointed_bytes_per_row is None:
        micro = micro_for(full_bytes_per_row)
        why = (f"{full_bytes_per_row / gib:.2f} GiB of activations per row, {budget_bytes / gib:.2f} GiB free for them")
        if rows_fitting(full_bytes_per_row) < 1:
            why += "; even one row may not fit, and this backend cannot checkpoint"
        return MemoryChoice(False, micro, why)
    micro = micro_for(checkpointed_bytes_per_row)
    return MemoryChoice(True, micro, f"one row needs {full_bytes_per_row / gib:.2f} GiB without checkpointing, "
                                     f"{checkpointed_bytes_per_row / gib:.2f} GiB with it; "
                                     f"{budget_bytes / gib:.2f} GiB free for activations")


def saved_activation_bytes(forward) -> int:
    """Bytes of the activations autograd keeps for the backward pass while `forward()` runs: the
    distinct storages of the saved tensors that an operation produced (a grad_fn). Leaves — the
    frozen weights, the trainable parameters, inputs that need no gradient — already exist apart
    from the graph and are not counted. The graph is dropped after."""
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.grad_fn is not None:
            storage = tensor.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(kept.values())


class RunMemory:
    """The run's memory choice: settled at the first request that trains (`micro_batch_size`), the
    backend's gradient checkpointing set accordingly, and set back when the `with` block ends."""

    def __init__(self, backend: Backend, method: Method, config: UnlearnConfig):
        self.backend, self.method, self.config = backend, method, config
        self.choice: MemoryChoice | None = None
        self._checkpointing_before: bool | None = None

    def __enter__(self) -> "RunMemory":
        return self

    def __exit__(self, *exc) -> None:
        if self._checkpointing_before is not None:
            self.backend.set_gradient_checkpointing(self._checkpointing_before)

    def micro_batch_size(self, params: list[torch.nn.Parameter], cache, rows: int) -> int:
        """Rows per UNet pass for a step of `rows` rows; the first call settles the run's choice, measuring
        one row of `cache` (a RequestCache) and counting `params`' gradients and AdamW moments."""
        if self.choice is None:
            self.choice = self._choose(params, cache, rows)
            self._checkpointing_before = self.backend.set_gradient_checkpointing(self.choice.gradient_checkpointing)
            logger.info("memory: gradient checkpointing %s, %s (%s)", "on" if self.choice.gradient_checkpointing else "off",
                        f"micro-batches of {self.choice.micro_batch_size} rows" if self.choice.micro_batch_size
                        else "the whole batch in one pass", self.choice.reason)
        return self.choice.micro_batch_size

    def step_micro_batch_size(self, params: list[torch.nn.Parameter], cache) -> int:
        """`micro_batch_size` for this process's share of a step's rows: batch_size, plus replay_batch_size
        in the sequential setting whether or not the request replays, so a resumed run settles as an
        uninterrupted one does."""
        config = self.config
        rows = shard_rows(config.batch_size + (config.replay_batch_size if config.setting == "sequential" else 0))
        return self.micro_batch_size(params, cache, rows.stop - rows.start)

    def _choose(self, params: list[torch.nn.Parameter], cache, rows: int) -> MemoryChoice:
        """Settle "auto" settings: the activations one row keeps (measured: one row of `cache` through the UNet
        with gradient, attention captured as in training) against `memory_budget_gb`, or the device's free
        memory now times `MEMORY_MARGIN`, less the gradients and AdamW moments `params` will need."""
        backend, config = self.backend, self.config
        if config.gradient_checkpointing != "auto" and config.micro_batch_size != "auto":
            return MemoryChoice(bool(config.gradient_checkpointing), int(config.micro_batch_size), "as configured")
        optimizer_bytes = 12 * sum(p.numel() for p in params)  # gradients and AdamW's two moments, float32
        if config.memory_budget_gb is not None:
            budget = max(0.0, config.memory_budget_gb * 2**30 - optimizer_bytes)
        else:
            free = free_memory_bytes(backend.device)
            budget = None if free is None else max(0.0, (free - optimizer_bytes) * MEMORY_MARGIN)
        previous = backend.set_gradient_checkpointing(False)
        req = cache.request
        template = req.templates[cache.anchor_templates[0]] if cache.anchor_templates else req.templates[0]
        prompt = [render_prompt(template, req.target)]
        latents = (cache.anchor_latents if len(cache.anchor_latents) else cache.target_latents)[:1].to(backend.device)
        t = torch.full((1,), backend.num_train_timesteps // 2, device=backend.device)
        tokens, mask = backend.token_indices(prompt, [req.target])
        context = backend.encode_prompts(prompt)
        capture = self.method.attention_term and config.beta > 0
        per_row = saved_activation_bytes(lambda: predict(backend, latents, t, context, tokens, mask, config, capture))
        ratio = backend.gradient_checkpointing_ratio()
        backend.set_gradient_checkpointing(previous)
        return choose_memory_settings(rows, per_row, per_row * ratio if ratio else None, budget,
                                      config.gradient_checkpointing, config.micro_batch_size)

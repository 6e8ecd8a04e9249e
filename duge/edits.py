"""Edits of a model's linear layers as deltas on top of its frozen weights: W = W0 + delta.

One mechanism serves every backend: `DeltaWeight` computes a layer's delta (the sum of the
deltas of finished requests, plus the current request's trainable delta — a full matrix or a
LoRA pair up @ down). In diffusers it is installed with `torch.nn.utils.parametrize`; in
ComfyUI the same module is a ModelPatcher weight wrapper. W0 is never written to, so removing
the edits restores the host's weights bit for bit; disabling them gives the frozen reference
model (θ0) without a second copy of the UNet.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


class DeltaWeight(nn.Module):
    """weight [out, in] -> weight + delta, where delta = committed + current request's trainable part."""

    def __init__(self, weight: torch.Tensor, mode: str = "full", rank: int = 4):
        super().__init__()
        if mode not in ("full", "lora"):
            raise ValueError(f"trainable mode must be 'full' or 'lora', got {mode!r}")
        out_features, in_features = weight.shape
        self.mode = mode
        self.rank = min(rank, out_features, in_features)
        self.enabled = True
        self.reference_only = False  # use only the committed deltas (the model before this request)
        # Deltas of finished requests (float32 master copy on the weight's device).
        self.register_buffer("committed", torch.zeros(out_features, in_features, device=weight.device))
        self.delta: nn.Parameter | None = None
        self.up: nn.Parameter | None = None
        self.down: nn.Parameter | None = None
        self._shape = (out_features, in_features)

    def start_request(self, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """New trainable parameters for a request, initialised so that the delta starts at zero."""
        out_features, in_features = self._shape
        device = self.committed.device
        if self.mode == "full":
            self.delta = nn.Parameter(torch.zeros(out_features, in_features, device=device))
            return [self.delta]
        down = torch.empty(self.rank, in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(device))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, device=device))
        return [self.up, self.down]

    def request_delta(self) -> torch.Tensor:
        """The current request's delta [out, in] (differentiable); zeros if none is being trained."""
        if self.mode == "full" and self.delta is not None:
            return self.delta
        if self.mode == "lora" and self.up is not None:
            return self.up @ self.down
        return torch.zeros_like(self.committed)

    def total_delta(self) -> torch.Tensor:
        return self.committed + self.request_delta()

    def commit_request(self) -> torch.Tensor:
        """Fold the current request's delta into `committed`; return it (detached, float32)."""
        delta = self.request_delta().detach().float().clone()
        self.committed += delta
        self.delta = self.up = self.down = None
        return delta

    def discard_request(self) -> None:
        self.delta = self.up = self.down = None

    def reset(self) -> None:
        """Forget every committed delta (used by the independent setting)."""
        self.committed.zero_()
        self.discard_request()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.reference_only:
            return weight + self.committed.to(weight.dtype)
        return weight + self.total_delta().to(weight.dtype)


class LayerEdits:
    """The `DeltaWeight`s of one model, by layer name, with the operations the trainer needs."""

    def __init__(self, deltas: dict[str, DeltaWeight], originals: dict[str, torch.Tensor]):
        self.deltas = deltas
        self.originals = originals  # θ0 of each edited layer: the host's own (never written) weights

    def start_request(self, seed: int) -> list[nn.Parameter]:
        generator = torch.Generator().manual_seed(seed)
        params: list[nn.Parameter] = []
        for name in sorted(self.deltas):
            params += self.deltas[name].start_request(generator)
        return params

    def commit_request(self) -> dict[str, torch.Tensor]:
        return {name: d.commit_request() for name, d in self.deltas.items()}

    def discard_request(self) -> None:
        for d in self.deltas.values():
            d.discard_request()

    def reset(self) -> None:
        for d in self.deltas.values():
            d.reset()

    def total_deltas(self) -> dict[str, torch.Tensor]:
        """Differentiable total delta per layer [out, in]."""
        return {name: d.total_delta() for name, d in self.deltas.items()}

    def committed(self) -> dict[str, torch.Tensor]:
        return {name: d.committed.detach().clone() for name, d in self.deltas.items()}

    def load_committed(self, deltas: dict[str, torch.Tensor]) -> None:
        for name, d in self.deltas.items():
            d.committed.copy_(deltas[name].to(d.committed))

    @torch.no_grad()
    def add_committed(self, deltas: dict[str, torch.Tensor]) -> None:
        """Add a finished request's deltas to the committed ones (as `commit_request` does)."""
        for name, d in self.deltas.items():
            d.committed += deltas[name].to(d.committed)

    def reference_is_original(self) -> bool:
        """Whether the reference model is θ0 itself: nothing committed (the first request, or after `reset`)."""
        return not any(bool(d.committed.any()) for d in self.deltas.values())

    @contextmanager
    def reference(self):
        """The frozen reference for the current request: the model as the previous request left it
        (θ0 plus the committed deltas, without the delta being trained)."""
        for d in self.deltas.values():
            d.reference_only = True
        try:
            yield
        finally:
            for d in self.deltas.values():
                d.reference_only = False

    @contextmanager
    def disabled(self):
        """The frozen reference model θ0: every delta switched off inside the block."""
        previous = {name: d.enabled for name, d in self.deltas.items()}
        for d in self.deltas.values():
            d.enabled = False
        try:
            yield
        finally:
            for name, d in self.deltas.items():
                d.enabled = previous[name]


def trainable_pattern(trainable: str) -> str:
    """Regular expression over module names for a trainable set: 'kv' (default), 'qkv' or 'attn2'."""
    patterns = {
        "kv": r"attn2\.to_[kv]$",
        "qkv": r"attn2\.to_[qkv]$",
        "attn2": r"attn2\.(to_[qkv]|to_out\.0)$",
    }
    if trainable not in patterns:
        raise ValueError(f"trainable set must be one of {sorted(patterns)}, got {trainable!r}")
    return patterns[trainable]

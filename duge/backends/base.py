"""The interface every backend gives the trainer (design doc §4).

The losses and the continual loop see only tensors and these calls. A backend owns the host
model's UNet and text encoder, never changes the host's weights for good, and exposes the
cross-attention K/V projections as named linear layers that the trainer edits through
`delta` parametrisations (see `duge.edits`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class TextConditioning:
    """Text conditioning of a model with a pooled text input (SDXL): what `encode_prompts` returns there.

    hidden: [B, tokens, dim] (the UNet's cross-attention context); pooled: [B, pooled_dim] (the second
    text encoder's projected end-of-text embedding). Indexing and slicing select prompts, as on a
    tensor of hidden states, so the trainer can treat both kinds alike.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> "TextConditioning":
        return TextConditioning(self.hidden[index], self.pooled[index])

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    def to(self, *args, **kwargs) -> "TextConditioning":
        return TextConditioning(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


def text_hidden_states(conditioning: torch.Tensor | TextConditioning) -> torch.Tensor:
    """The cross-attention context [B, tokens, dim] of either kind of conditioning."""
    return conditioning.hidden if isinstance(conditioning, TextConditioning) else conditioning


class Backend(Protocol):
    device: torch.device
    prediction_type: str  # "epsilon" | "v_prediction"
    num_train_timesteps: int

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | TextConditioning:
        """Text conditioning [B, tokens, dim] from the frozen text encoder (no grad); a
        `TextConditioning` for models that also take a pooled text embedding (SDXL)."""

    def token_indices(self, prompts: list[str], words: list[str], eos_fallback: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of `words[i]` in tokenized `prompts[i]`: (indices [B, K] long, mask [B, K] bool)."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for latents [B, C, h, w] and timesteps [B]."""

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | TextConditioning) -> torch.Tensor:
        """The UNet's output (epsilon or v, per `prediction_type`) [B, C, h, w]."""

    def sample_latents(self, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
        """Clean latents [B, C, h, w] (scaled as the UNet sees them) generated from `prompts`."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from scaled latents."""

    def cross_attention_layers(self) -> list[str]:
        """Names of the cross-attention modules, in forward order."""

    def trainable_linears(self, pattern: str) -> dict[str, torch.nn.Linear]:
        """Linear layers (by the backend's module name) whose names match the trainable-set pattern."""

    def capture_attention(self, layers: list[str] | None, token_indices: torch.Tensor) -> AbstractContextManager:
        """Context manager capturing cross-attention probabilities for the given token columns."""

    def set_gradient_checkpointing(self, enabled: bool) -> bool:
        """Recompute UNet blocks in the backward pass (True) or not; returns the previous setting.
        A backend that cannot checkpoint refuses True with a DugeError."""

    def gradient_checkpointing_ratio(self) -> float | None:
        """Activations kept per row with gradient checkpointing over those kept without (planned from
        the UNet's config, `duge.plan`); None when this backend cannot checkpoint."""

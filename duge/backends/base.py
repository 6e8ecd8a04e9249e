"""The interface every backend gives the trainer (design doc §4): `Backend`.

The losses and the continual loop see only tensors and these calls. A backend owns the host
model's UNet and text encoder, never changes the host's weights for good, and exposes the
cross-attention K/V projections as named linear layers that the trainer edits through
`delta` parametrisations (see `duge.edits`). Two implement it: `DiffusersBackend` and
`ComfyBackend`.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from typing import Callable, Mapping, Protocol, Sequence

import torch

from ..conditioning import TextConditioning
from ..edits import LayerEdits

SAMPLED_VALUES = 4096  # values per tensor a fingerprint samples


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module, extra: Mapping[str, torch.Tensor] | None = None) -> str:
    """SHA-256 over each state-dict tensor's name, shape and a strided sample of at most `SAMPLED_VALUES`
    of its values (and of `extra`'s tensors): what the module computes, cheaply — hashing every byte
    would take seconds on SDXL. With DUGE's edits installed as parametrisations the state dict holds
    W0 and the committed deltas, i.e. the reference model."""
    digest = hashlib.sha256()
    tensors = dict(module.state_dict())
    tensors.update({f"extra/{k}": v for k, v in (extra or {}).items()})
    for key, value in sorted(tensors.items()):
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)].float().cpu().contiguous()
        digest.update(f"{key}\0{list(value.shape)}\0".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
def image_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """The seed of each of `n` images: `seed + i` for one seed, else the list itself (of length n)."""
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; expected one seed per prompt")
    return seeds


def text_hidden_states(conditioning: torch.Tensor | TextConditioning) -> torch.Tensor:
    """The cross-attention context [B, tokens, dim] of either kind of conditioning."""
    return conditioning.hidden if isinstance(conditioning, TextConditioning) else conditioning


class Backend(Protocol):
    """Everything the trainer, the image cache and the evaluation call on a host model."""

    device: torch.device
    prediction_type: str  # "epsilon" | "v_prediction"
    num_train_timesteps: int

    def edits(self, pattern: str, mode: str = "full", rank: int = 4) -> AbstractContextManager[LayerEdits]:
        """Install `DeltaWeight` edits on the linear layers matching `pattern` (`duge.edits`) for the
        `with` block; removed on exit, leaving the host's weights bit-identical."""

    def fingerprint(self) -> str:
        """A hash of the model as it computes now (weights, patches and committed deltas) and of the size of
        the images it generates, for the on-disk image cache (`duge.image_cache`)."""

    def generate(self, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (sample_latents, then decode)."""

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | TextConditioning:
        """Text conditioning [B, tokens, dim] from the frozen text encoder (no grad); a
        `TextConditioning` for models that also take a pooled text embedding (SDXL)."""

    def token_indices(self, prompts: list[str], words: list[str], eos_fallback: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of `words[i]` in tokenized `prompts[i]`: (indices [B, K] long, mask [B, K] bool)."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for latents [B, C, h, w] and timesteps [B]."""

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | TextConditioning) -> torch.Tensor:
        """The UNet's output (epsilon or v, per `prediction_type`) [B, C, h, w]."""

    def sample_latents(self, prompts: list[str], seed: int | Sequence[int], steps: int, guidance: float,
                       on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Clean latents [B, C, h, w] (scaled as the UNet sees them) generated from `prompts`: image i from
        seed `seed + i`, or `seed[i]` given a list (`image_seeds`); `on_step()` after each sampler step."""

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

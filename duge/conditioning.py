"""Text conditioning as the UNet takes it: a tensor of hidden states, or hidden + pooled states (SDXL).

A leaf module (torch only), so that the backends, the closed-form baseline (`duge.uce`) and the
input-space preservation (`duge.preservation`) read conditioning without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

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

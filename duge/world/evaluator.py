"""The built-in world's evaluator: a small CNN that says which object, colour and style an image shows.

Trained by `duge world train` on the scene generator's ground truth only (never on model samples),
with blur and noise augmentation so that decoded samples, which are softer than renders, are read
fairly. Shipped as `evaluator.safetensors` beside the built-in model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..safe_weights import load_tensors
from .vocabulary import CONCEPTS_BY_KIND, KINDS


class WorldEvaluator(nn.Module):
    """images [B, 3, 32, 32] in [0, 1] -> logits per kind: {"object": [B, 8], "colour": [B, 8], "style": [B, 5]}."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),  # 16x16
            block(width, 2 * width), nn.MaxPool2d(2),  # 8x8
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({kind: nn.Linear(4 * width, len(CONCEPTS_BY_KIND[kind])) for kind in KINDS})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 4*width], used for distribution distances."""
        return self.features(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.embed(images)
        return {kind: head(feats) for kind, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Canonical concept names per kind for a batch of images [B, 3, H, W] in [0, 1]."""
        self.eval()
        logits = self(_to_evaluator_size(images))
        return {
            kind: [CONCEPTS_BY_KIND[kind][i].name for i in out.argmax(-1).tolist()] for kind, out in logits.items()
        }


def _to_evaluator_size(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] != 32 or images.shape[-2] != 32:
        images = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
    return images.float()


def load_evaluator(path: str | Path) -> WorldEvaluator:
    """Load the evaluator from a safetensors file (checked by `duge.safe_weights`; no pickle)."""
    model = WorldEvaluator()
    model.load_state_dict(load_tensors(path))
    return model.eval()

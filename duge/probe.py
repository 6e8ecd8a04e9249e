"""Attention probe: where a prompt's words look in the image the model generates for it.

`probe_attention` generates the image for the prompt, then re-noises its latent at a few
timesteps and runs the UNet once per timestep with the words' cross-attention captured
(`backend.capture_attention`); the per-layer maps are averaged over heads, layers and timesteps
(the DAAM recipe, on the model's own sample). Works with every backend. `heatmap_panel` turns the
result into one labelled image: the generated image, then one overlay per word; `panel_layout`
says where each tile of it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .attention import attention_heatmaps
from .backends.base import Backend
from .errors import DugeError
from .grids import to_pil

DEFAULT_PROBE_TIMESTEPS = (200, 400, 600, 800)


@dataclass
class ProbeResult:
    """image [3, H, W] in [0, 1]; heatmaps [K, h, w] (latent size, each normalised to [0, 1]);
    words: the K probed words; found: whether each word occurs in the prompt's tokens."""

    prompt: str
    image: torch.Tensor
    heatmaps: torch.Tensor
    words: list[str]
    found: list[bool]


def parse_words(text: str) -> list[str]:
    """Words to probe from a comma-separated field ("circle, red" -> ["circle", "red"]); phrases keep their spaces."""
    words = [w.strip() for w in str(text).split(",")]
    words = [w for w in words if w]
    if not words:
        raise DugeError("words: expected at least one word to probe, e.g. 'circle' or 'Van Gogh, painting'")
    return words


@torch.no_grad()
def probe_attention(backend: Backend, prompt: str, words: list[str], seed: int, steps: int = 20, guidance: float = 7.5,
                    timesteps=DEFAULT_PROBE_TIMESTEPS, latents: torch.Tensor | None = None) -> ProbeResult:
    """Per-word cross-attention heatmaps of `prompt` over the image the backend's model makes for it.

    `latents` [1, C, h, w] (as the UNet sees them) skips generation: e.g. to probe a second model
    on the first one's image. A word missing from the prompt gives an all-zero map and found=False.
    """
    if latents is None:
        latents = backend.sample_latents([prompt], seed, steps, guidance)
    latents = latents[:1].to(backend.device)
    image = backend.decode(latents)[0]
    context = backend.encode_prompts([prompt])
    generator = torch.Generator().manual_seed(seed + 1)
    maps_per_word = []
    found = []
    for word in words:
        indices, mask = backend.token_indices([prompt], [word])
        found.append(bool(mask.any()))
        accumulated = None
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            t_batch = torch.full((1,), int(t), device=backend.device, dtype=torch.long)
            noisy = backend.add_noise(latents, noise, t_batch)
            with backend.capture_attention(None, indices) as store:
                backend.predict_noise(noisy, t_batch, context)
                maps = {name: (m * mask[:, None, None, :].to(m)).sum(-1, keepdim=True) for name, m in store.maps.items()}
            heat = attention_heatmaps(maps, tuple(latents.shape[-2:]))[0, 0]  # [h, w]
            accumulated = heat if accumulated is None else accumulated + heat
        maps_per_word.append(accumulated / len(timesteps))
    heatmaps = torch.stack(maps_per_word).float().cpu()
    peak = heatmaps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    heatmaps = torch.where(torch.tensor(found)[:, None, None], heatmaps / peak, torch.zeros_like(heatmaps))
    return ProbeResult(prompt, image.float().cpu(), heatmaps, list(words), found)


def _colormap(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] in [0, 1]: dark blue → red → yellow (a small 'inferno'-like ramp)."""
    stops = np.array([[0.0, 0.0, 0.25], [0.55, 0.0, 0.55], [0.95, 0.25, 0.1], [1.0, 0.95, 0.3]])
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """image [3, H, W] in [0, 1] with heatmap [h, w] in [0, 1] resized (bilinear) and blended on top."""
    height, width = image.shape[-2:]
    heat = torch.nn.functional.interpolate(heatmap[None, None].float(), size=(height, width), mode="bilinear",
                                           align_corners=False)[0, 0].clamp(0, 1)
    colored = torch.from_numpy(_colormap(heat.numpy())).permute(2, 0, 1).float()
    return (image.float() * (1 - alpha) + colored * alpha).clamp(0, 1)


@dataclass
class PanelLayout:
    """Where the tiles of a `heatmap_panel` are, in pixels, so that a viewer can crop one word's map
    (the ComfyUI extension web/duge.js does). Tile (row i, column j) is the square of side `cell`
    at x = left + j·cell, y = top + i·cell; column 0 is the generated image, column j > 0 the
    overlay of word j - 1. `rows`: the row labels ("" when unlabelled); `found[i][k]`: word k
    occurs in row i's prompt (its map is empty otherwise)."""

    cell: int
    left: int
    top: int
    columns: list[str]
    rows: list[str]
    found: list[list[bool]]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the panel."""
        return self.left + len(self.columns) * self.cell, self.top + len(self.rows) * self.cell

    def tile(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of a tile."""
        return self.left + column * self.cell, self.top + row * self.cell, self.cell, self.cell

    def as_dict(self) -> dict:
        """JSON-ready, with the panel's width and height."""
        width, height = self.size
        return {"cell": self.cell, "left": self.left, "top": self.top, "width": width, "height": height,
                "columns": list(self.columns), "rows": list(self.rows), "found": [list(f) for f in self.found]}


def panel_layout(results: list[ProbeResult], row_labels: list[str] | None = None, cell: int = 128) -> PanelLayout:
    """The layout `heatmap_panel` draws for these results."""
    if not results:
        raise DugeError("no probe results to draw")
    if row_labels is not None and len(row_labels) != len(results):
        raise DugeError(f"{len(row_labels)} row labels for {len(results)} probe results")
    return PanelLayout(cell=cell, left=110 if row_labels else 0, top=16, columns=["image"] + list(results[0].words),
                       rows=list(row_labels) if row_labels else [""] * len(results),
                       found=[list(r.found) for r in results])


def heatmap_panel(results: list[ProbeResult], row_labels: list[str] | None = None, cell: int = 128) -> Image.Image:
    """One row per result: the generated image, then one overlay per word, columns labelled by word
    (tile positions: `panel_layout` with the same arguments)."""
    layout = panel_layout(results, row_labels, cell)
    font = ImageFont.load_default()
    panel = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(panel)
    for j, title in enumerate(layout.columns):
        draw.text((layout.tile(0, j)[0] + 4, 2), title, fill="black", font=font)
    for i, result in enumerate(results):
        if row_labels:
            draw.text((4, layout.tile(i, 0)[1] + 4), layout.rows[i], fill="black", font=font)
        tiles = [result.image] + [overlay(result.image, h) for h in result.heatmaps]
        for j, tile in enumerate(tiles):
            x, y, _, _ = layout.tile(i, j)
            panel.paste(to_pil(tile).resize((cell, cell), Image.NEAREST), (x, y))
            if j > 0 and not result.found[j - 1]:
                draw.text((x + 4, y + cell - 14), "not in prompt", fill="white", font=font)
    return panel


def pil_to_image_batch(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, H, W, 3] float in [0, 1] (ComfyUI's IMAGE layout)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]

"""Labelled image grids (PIL), used by sampling, comparisons and reports."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], cell: int = 128, label_width: int = 260,
                  column_labels: list[str] | None = None) -> Image.Image:
    """A grid with one row per list of images, each row labelled on its left; cells upscaled to `cell` px."""
    font = ImageFont.load_default()
    n_cols = max((len(r) for r in rows), default=0)
    header = 18 if column_labels else 0
    grid = Image.new("RGB", (label_width + n_cols * cell, header + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    if column_labels:
        for j, text in enumerate(column_labels):
            draw.text((label_width + j * cell + 4, 3), text, fill="black", font=font)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        y = header + i * cell
        _draw_wrapped(draw, label, (6, y + 6), label_width - 12, font)
        for j, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + j * cell, y))
    return grid


def _draw_wrapped(draw: ImageDraw.ImageDraw, text: str, origin, width: int, font) -> None:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    x, y = origin
    for k, text_line in enumerate(lines[:6]):
        draw.text((x, y + 13 * k), text_line, fill="black", font=font)

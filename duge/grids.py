"""Labelled image grids (PIL), used by sampling, comparisons and reports."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_FONT_PX = 18  # row and column labels; report.html shows the grid unscaled up to 1100 px wide
MAX_LABEL_WIDTH = 300  # a row label wraps to this width (the label column is as wide as its longest line)
MAX_LABEL_LINES = 6
PADDING = 8


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def label_font(size: int = LABEL_FONT_PX):
    """PIL's bundled scalable font at `size` px (Pillow ≥ 10.1); its fixed 11 px bitmap font on older Pillow."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: load_default() takes no size
        return ImageFont.load_default()


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], cell: int = 96,
                  column_labels: list[str] | None = None, font_size: int = LABEL_FONT_PX) -> Image.Image:
    """A grid with one row per list of images, each row labelled on its left; cells upscaled to `cell` px.

    The label column is as wide as the longest (wrapped) label line, so no part of the grid is empty;
    labels are drawn `font_size` px high.
    """
    font = label_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, MAX_LABEL_WIDTH, font)[:MAX_LABEL_LINES] for label in row_labels]
    line_height = _line_height(font)
    text_width = max((measure.textlength(line, font=font) for lines in wrapped for line in lines), default=0)
    label_width = int(text_width) + 2 * PADDING if text_width else 0
    row_height = max(cell, max((len(lines) for lines in wrapped), default=0) * line_height + 2 * PADDING)
    n_cols = max((len(r) for r in rows), default=0)
    header = line_height + PADDING if column_labels else 0
    grid = Image.new("RGB", (label_width + n_cols * cell, header + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(column_labels or []):
        draw.text((label_width + j * cell + PADDING // 2, PADDING // 2), text, fill="black", font=font)
    for i, (images, lines) in enumerate(zip(rows, wrapped)):
        y = header + i * row_height
        for k, line in enumerate(lines):
            draw.text((PADDING, y + PADDING + k * line_height), line, fill="black", font=font)
        for j, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + j * cell, y))
    return grid


def _line_height(font) -> int:
    if not hasattr(font, "getmetrics"):  # the old bitmap font
        return 13
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines

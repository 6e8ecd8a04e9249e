"""`duge world render`: scenes as PNG files with a `labels.jsonl` of their ground truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from ..paths import atomic_write_bytes, atomic_write_text, check_writable
from .scenes import render_dataset


def write_rendered_scenes(n: int, seed: int, out: Path, overwrite: bool = False) -> None:
    """Write `n` scenes (deterministic in `seed`) as `00000.png`, ... and `labels.jsonl` into `out`."""
    out = Path(out)
    check_writable(out / "labels.jsonl", overwrite)
    images, scenes = render_dataset(n, seed)
    width = max(5, len(str(n - 1)))
    lines = []
    for i, (image, scene) in enumerate(zip(images, scenes)):
        name = f"{i:0{width}d}.png"
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write_bytes(out / name, buffer.getvalue(), overwrite=True)
        lines.append(json.dumps({"file": name, "caption": scene.caption, "object": scene.object,
                                 "colour": scene.colour, "style": scene.style}))
    atomic_write_text(out / "labels.jsonl", "\n".join(lines) + "\n", overwrite=True)

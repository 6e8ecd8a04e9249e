"""`duge sample`: images from a model for one prompt or a file of prompts."""

from __future__ import annotations

import io
from pathlib import Path

from tqdm.auto import tqdm

from .errors import DugeError
from .grids import labelled_grid, to_pil
from .models import load_pipeline
from .paths import atomic_write, atomic_write_bytes, check_writable
from .world.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DugeError(f"cannot read prompts file '{path}': {err}") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DugeError(f"prompts file '{path}' has no prompts; expected one prompt per line")
    return prompts


def sample_prompts(pipe, prompts: list[str], n: int, seed: int, steps: int, guidance: float, progress=None):
    """[[image tensor [3, H, W]] * n for each prompt]; prompt p's image s uses seed `seed + s` (same seed, same images)."""
    rows = []
    for prompt in prompts:
        images = generate(pipe, [prompt] * n, seed, steps=steps, guidance=guidance)
        rows.append(list(images))
        if progress:
            progress.update(1)
    return rows


def run_sample_command(args) -> int:
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if args.n < 1:
        raise DugeError(f"--n must be at least 1, got {args.n}")
    out = Path(args.out)
    as_grid_file = out.suffix.lower() == ".png"
    if as_grid_file:
        check_writable(out, args.overwrite)
    else:
        check_writable(out / "grid.png", args.overwrite)
    pipe = load_pipeline(args.model, allow_pickle=getattr(args, "allow_pickle", False))
    steps = args.steps or DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    with tqdm(total=len(prompts), desc="sampling", unit="prompt") as bar:
        rows = sample_prompts(pipe, prompts, args.n, args.seed, steps, guidance, progress=bar)
    pil_rows = [[to_pil(image) for image in row] for row in rows]
    grid = labelled_grid(pil_rows, prompts, column_labels=[f"seed {args.seed + s}" for s in range(args.n)])
    grid_path = out if as_grid_file else out / "grid.png"
    if not as_grid_file:
        for p, row in enumerate(pil_rows):
            for s, image in enumerate(row):
                atomic_write_bytes(out / f"{p:03d}_{s:03d}.png", _png_bytes(image), overwrite=args.overwrite)
    atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"), overwrite=args.overwrite)
    print(f"wrote {grid_path}")
    return 0


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

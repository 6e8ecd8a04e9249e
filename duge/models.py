"""Finding and loading the models a user names: `builtin`, a diffusers folder, or a single file."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError

BUILTIN = "builtin"


def resolve_model_path(model: str | Path) -> Path:
    """The folder or file behind `model` ('builtin' is the shipped tiny model)."""
    from .world.model import BUILTIN_MODEL_DIR

    if str(model) == BUILTIN:
        if not (BUILTIN_MODEL_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"the built-in model is missing from '{BUILTIN_MODEL_DIR}'; "
                "reinstall the package or train it with `duge world train`"
            )
        return BUILTIN_MODEL_DIR
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model '{model}' does not exist; expected 'builtin', a diffusers folder or a .safetensors file")
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"'{path}' is a folder without model_index.json; expected a diffusers pipeline folder "
                "(e.g. the `model/` folder that `duge unlearn` writes)"
            )
        return path
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"'{path}' is not a .safetensors file or a diffusers folder; pickled checkpoints "
            "(.ckpt/.pt/.bin) are not loaded — convert them to safetensors first"
        )
    return path


def load_pipeline(model: str | Path, torch_dtype=None):
    """A `StableDiffusionPipeline` for `model`, loaded offline; ModelLoadError if it is not a model."""
    import torch
    from diffusers import StableDiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(model)
    dtype = torch_dtype or torch.float32
    try:
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(
                path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
            )
        else:
            from .io import load_single_file_pipeline

            pipe = load_single_file_pipeline(path, torch_dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers raises many kinds for a broken folder
        raise ModelLoadError(f"could not load '{path}' as a Stable Diffusion pipeline: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_builtin(model: str | Path) -> bool:
    """True for the built-in model (by name or path)."""
    from .world.model import BUILTIN_MODEL_DIR

    if str(model) == BUILTIN:
        return True
    try:
        return Path(model).resolve() == BUILTIN_MODEL_DIR.resolve()
    except OSError:
        return False

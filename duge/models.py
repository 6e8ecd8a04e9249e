"""Finding and loading the models a user names: `builtin`, a diffusers folder, or a single file."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError

BUILTIN = "builtin"


def resolve_model_path(model: str | Path, allow_pickle: bool = False) -> Path:
    """The folder or file behind `model` ('builtin' is the shipped tiny model).

    A pickled single file (.ckpt/.pt/.pth/.bin) is refused unless `allow_pickle`."""
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
    from .safe_weights import PICKLE_HELP, is_pickle_path

    if is_pickle_path(path) and not allow_pickle:
        raise ModelLoadError(f"'{path}' is a pickled checkpoint ({path.suffix.lower()}); {PICKLE_HELP}")
    if path.suffix.lower() != ".safetensors" and not is_pickle_path(path):
        raise ModelLoadError(f"'{path}' is not a .safetensors file or a diffusers folder")
    return path


def check_folder_weights(folder: Path) -> None:
    """Check the header of every .safetensors file in a diffusers folder before diffusers reads it.

    A component folder whose weights are only pickles (`diffusion_pytorch_model.bin`) is refused:
    diffusers is always asked for safetensors (`--allow-pickle` applies to single files only).
    """
    from .safe_weights import is_pickle_path, read_header

    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in component.iterdir() if p.is_file())
        weights = [p for p in files if p.suffix == ".safetensors"]
        for weights_file in weights:
            read_header(weights_file)
        pickles = [p for p in files if is_pickle_path(p)]
        if pickles and not weights:
            raise ModelLoadError(
                f"'{pickles[0]}' is pickled and '{component}' has no .safetensors weights; diffusers folders are "
                f"loaded from safetensors only. Convert the folder in an environment you trust "
                f"(`StableDiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR)` writes safetensors), "
                "(pickles can run code when loaded, so they are not read)"
            )


def check_finite_weights(pipe, source: Path) -> None:
    """ModelLoadError naming the component and parameter of the first NaN/inf weight of a loaded pipeline."""
    import torch

    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelLoadError(f"'{source}': {component} weight '{name}' holds NaN/inf values; "
                                     "expected finite weights (the file is corrupt or the model diverged)")


def load_pipeline(model: str | Path, torch_dtype=None, config_dir: str | Path | None = None,
                  allow_pickle: bool = False):
    """A diffusers pipeline for `model`, loaded offline; ModelLoadError if it is not a model DUGE edits.

    SD 1.x and SD 2.x give a `StableDiffusionPipeline`, SDXL a `StableDiffusionXLPipeline`
    (`duge.layouts`); other architectures raise `UnsupportedLayoutError` naming what was found.
    `config_dir`: a local diffusers folder with the configs and tokenizer(s) of a single file's
    architecture (see `duge.io.load_single_file_pipeline`). Weights are read from safetensors with
    their headers checked and NaN/inf refused (`duge.safe_weights`); a pickled single file only
    with `allow_pickle` (`torch.load(weights_only=True)`).
    """
    import diffusers
    import torch

    from .layouts import folder_layout

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(model, allow_pickle=allow_pickle)
    dtype = torch_dtype or torch.float32
    try:
        if path.is_dir():
            check_folder_weights(path)
            layout = folder_layout(path)
            extra = ({"add_watermarker": False} if layout.name == "sdxl"
                     else {"safety_checker": None, "requires_safety_checker": False})
            pipe = getattr(diffusers, layout.pipeline_class).from_pretrained(
                path, torch_dtype=dtype, local_files_only=True, use_safetensors=True, **extra)
            check_finite_weights(pipe, path)
        else:
            from .io import load_single_file_pipeline

            pipe = load_single_file_pipeline(path, torch_dtype=dtype, config_dir=config_dir,
                                             allow_pickle=allow_pickle)
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

"""Finding and loading the models a user names: `builtin`, a diffusers folder, or a single file.

`load_pipeline` gives a diffusers pipeline for any of them; a single-file checkpoint goes through
`load_single_file_pipeline`, which builds the pipeline from a local config folder (`--config`, the
one `duge.io.save_single_file` embeds, or the base model named in the file's manifest) and loads
the weights strictly, naming keys that do not fit. Saving is `duge.io`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from . import keys
from .errors import ModelLoadError
from .io import CONFIG_KEY, CONFIG_SUBFOLDERS, MANIFEST_KEY, parse_manifest, read_safetensors_metadata
from .layouts import UNET_CONV_IN_KEY, folder_layout, single_file_layout
from .paths import contained_path
from .safe_weights import (PICKLE_HELP, check_fits, is_pickle_path, load_tensors, read_header,
                           require_safetensors)
from .world.model import BUILTIN, BUILTIN_MODEL_DIR


def resolve_model_path(model: str | Path, allow_pickle: bool = False) -> Path:
    """The folder or file behind `model` ('builtin' is the shipped tiny model).

    A pickled single file (.ckpt/.pt/.pth/.bin) is refused unless `allow_pickle`."""
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
    architecture (see `load_single_file_pipeline`). Weights are read from safetensors with
    their headers checked and NaN/inf refused (`duge.safe_weights`); a pickled single file only
    with `allow_pickle` (`torch.load(weights_only=True)`).
    """
    import diffusers  # deferred: diffusers takes seconds to import

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
            pipe = load_single_file_pipeline(path, torch_dtype=dtype, config_dir=config_dir,
                                             allow_pickle=allow_pickle)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers raises many kinds for a broken folder
        raise ModelLoadError(f"could not load '{path}' as a Stable Diffusion pipeline: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_config_folder(folder: Path) -> Path:
    missing = [name for name in ("model_index.json", *CONFIG_SUBFOLDERS) if not (folder / name).exists()]
    if missing:
        raise ModelLoadError(
            f"config folder '{folder}' lacks {missing}; expected a diffusers pipeline folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ — weights are not needed)"
        )
    return folder


@contextmanager
def _config_folder(path: Path, metadata: Mapping[str, str], config_dir: str | Path | None,
                   layout=None) -> Iterator[Path]:
    """The config folder for a single file: `config_dir`, the one embedded in the file, or the base model's.

    SD 2.x and SDXL files need a folder with tokenizer files: a checkpoint holds no tokenizer, and the
    reference configs in duge/configs ship none (the CLIP vocabulary is 1.6 MB)."""
    if config_dir is not None:
        yield _check_config_folder(Path(config_dir).expanduser())
        return
    embedded = json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else {}
    if embedded and any(name.startswith("tokenizer/") for name in embedded):
        with tempfile.TemporaryDirectory(prefix="duge-config-") as folder:
            for name, text in embedded.items():
                target = contained_path(folder, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            yield _check_config_folder(Path(folder))
        return
    manifest = parse_manifest(metadata[MANIFEST_KEY], path) if MANIFEST_KEY in metadata else {}
    base = manifest.get("base_model")
    if base:
        candidate = BUILTIN_MODEL_DIR if base == BUILTIN else Path(base).expanduser()
        if (candidate / "model_index.json").exists():
            yield _check_config_folder(candidate)
            return
    if layout is not None and layout.name != "sd1":
        raise ModelLoadError(
            f"'{path}' is a {layout.title} single-file checkpoint and names no local config folder; pass a local "
            f"diffusers folder of a {layout.title} model (configs and tokenizer files, weights not needed) with "
            f"--config DIR (config_dir=...); duge/configs/{layout.reference_config} has the architecture but no "
            "tokenizer; nothing is downloaded")
    raise ModelLoadError(
        f"'{path}' is a single-file checkpoint without the configs needed to build its pipeline "
        "(no config or tokenizer stored in it, no local base model named in its manifest). "
        "Pass a local diffusers folder of the same architecture with --config DIR (config_dir=...); "
        "nothing is downloaded"
    )


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    check_fits(state, module.state_dict(), path, what)
    result = module.load_state_dict(state, strict=False, assign=True)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys, e.g. {result.unexpected_keys[:5]}")
    if problems:
        raise ModelLoadError(f"'{path}': the {what} weights do not fit its config: " + "; ".join(problems))


def _load_scheduler(folder: Path):
    """The scheduler named in the folder's model_index.json, from its scheduler config."""
    import diffusers  # deferred: diffusers takes seconds to import

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    _, class_name = index.get("scheduler") or (None, None)
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelLoadError(
            f"'{folder / 'model_index.json'}' names scheduler {class_name!r}; expected a diffusers scheduler class"
        )
    return cls.from_config(cls.load_config(folder / "scheduler"))


def load_single_file_pipeline(
    path: str | Path, torch_dtype: torch.dtype | None = None, config_dir: str | Path | None = None,
    allow_pickle: bool = False,
):
    """A `StableDiffusionPipeline` from a single-file SD checkpoint (safetensors), offline.

    The pipeline's architecture, tokenizer and scheduler come from `config_dir` (a local diffusers
    folder), else from the config folder embedded by `save_single_file`, else from the base model
    named in the file's manifest if it is 'builtin' or a local folder; otherwise ModelLoadError.
    Weights are converted with `duge.keys` and loaded strictly: every parameter must come from the
    file, and every tensor of the file must find a place (known extras such as EMA copies and noise
    schedule buffers are skipped). Tensors are read by `duge.safe_weights.load_tensors` (checked
    header, no NaN/inf); a pickled `.ckpt` is refused unless `allow_pickle` (then it is read with
    `torch.load(weights_only=True)` and needs `config_dir`).

    diffusers' own `StableDiffusionPipeline.from_single_file(path, config=folder)` also loads these
    files (tests/test_io.py), but it drops unexpected tensors silently and fails with "Cannot copy
    out of meta tensor" when one is missing; this loader names the keys instead.
    """
    from accelerate import init_empty_weights  # deferred with diffusers and transformers (seconds to import)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (allow_pickle and is_pickle_path(path)):
        require_safetensors(path)
    dtype = torch_dtype or torch.float32
    metadata = {} if is_pickle_path(path) else read_safetensors_metadata(path)
    pickled = load_tensors(path, allow_pickle=True) if is_pickle_path(path) else None  # only with allow_pickle
    layout = single_file_layout_of(path, pickled)
    if layout.name != "sd1" and pickled is not None:
        raise ModelLoadError(f"'{path}': a pickled {layout.name} checkpoint is not loaded even with allow_pickle "
                             "(diffusers would unpickle it itself); convert it to safetensors first")
    if layout.name != "sd1":
        with _config_folder(path, metadata, config_dir, layout) as folder:
            return _load_with_diffusers_single_file(path, layout, dtype, folder)
    with _config_folder(path, metadata, config_dir) as folder:
        with init_empty_weights():  # parameters on the meta device; buffers real
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        checkpoint = pickled if pickled is not None else load_tensors(path)
        parts = keys.split_ldm_checkpoint(checkpoint)
        if any(k.startswith(keys.LDM_OPEN_CLIP_PREFIX) for k in parts.unknown):
            raise ModelLoadError(
                f"'{path}' has an OpenCLIP text encoder ({keys.LDM_OPEN_CLIP_PREFIX}*: Stable Diffusion 2.x), "
                "which this loader does not convert; convert the file to a diffusers folder first "
                "(diffusers: StableDiffusionPipeline.from_single_file(...).save_pretrained(...))"
            )
        if parts.unknown:
            raise ModelLoadError(
                f"'{path}' holds {len(parts.unknown)} tensors outside the UNet, VAE and text encoder, "
                f"e.g. {parts.unknown[:5]}; expected a Stable Diffusion 1.x-style single-file checkpoint"
            )
        te_prefixed = any(k.startswith(keys.HF_TEXT_MODEL_PREFIX) for k in text_encoder.state_dict())
        try:
            states = {
                "UNet": (unet, keys.unet_from_ldm(parts.unet, unet.config)),
                "VAE": (vae, keys.vae_from_ldm(parts.vae, vae.config)),
                "text encoder": (text_encoder, keys.text_encoder_from_ldm(parts.text_encoder, te_prefixed)),
            }
        except keys.KeyLayoutError as err:
            raise ModelLoadError(f"'{path}' does not match the config of '{folder}': {err}") from err
        for what, (module, state) in states.items():
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
            _load_strict(module, state, what, path)
            module.eval()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            unet=unet,
            scheduler=_load_scheduler(folder),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_file_layout_of(path: str | Path, tensors: Mapping[str, torch.Tensor] | None = None):
    """The `duge.layouts.Layout` of a single-file checkpoint, from its checked header (no tensor is
    read), or from its `tensors` when they are loaded already (a pickle read with allow_pickle)."""
    if tensors is None:
        entries = read_header(path).tensors
        shapes_by_name = {name: list(e.shape) for name, e in entries.items()}
    else:
        shapes_by_name = {name: list(t.shape) for name, t in tensors.items()}
    names = list(shapes_by_name)
    shapes = {UNET_CONV_IN_KEY: shapes_by_name[UNET_CONV_IN_KEY]} if UNET_CONV_IN_KEY in shapes_by_name else {}
    return single_file_layout(names, shapes, str(path))


def _load_with_diffusers_single_file(path: Path, layout, dtype: torch.dtype, folder: Path):
    """An SD 2.x / SDXL pipeline from a single file by diffusers' `from_single_file` with the local
    config folder `folder` (never the hub); ModelLoadError if any parameter was left unloaded."""
    import diffusers  # deferred: diffusers takes seconds to import

    cls = getattr(diffusers, layout.pipeline_class)
    kwargs = {"config": str(folder), "local_files_only": True, "torch_dtype": dtype}
    if layout.name == "sdxl":
        kwargs["add_watermarker"] = False
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as err:  # diffusers raises many kinds for a file that does not fit the config
        raise ModelLoadError(f"'{path}' ({layout.title}) could not be loaded with the config folder '{folder}': {err}") from err
    for component in ("unet", "vae", *layout.text_encoders):
        unloaded = [name for name, p in getattr(pipe, component).named_parameters() if p.device.type == "meta"]
        if unloaded:
            raise ModelLoadError(f"'{path}': {len(unloaded)} {component} weights are missing from the file "
                                 f"(e.g. {unloaded[:3]}); expected a complete {layout.title} checkpoint")
    pipe.set_progress_bar_config(disable=True)
    return pipe

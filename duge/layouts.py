"""Which Stable Diffusion architecture a model is: SD 1.x, SD 2.x or SDXL, and their shipped configs.

A layout is recognised from a diffusers folder (`model_index.json` and the UNet config) or from
the tensor names of a single-file checkpoint (its header only). Anything else — inpainting UNets,
the SDXL refiner, SD 3, Flux, ... — raises `UnsupportedLayoutError` naming what was found.

`duge/configs/<name>/` holds the diffusers configs (no weights, no tokenizer) of the three public
reference models, written from their published `config.json` files (see duge/configs/README.md);
their parameter counts are checked in tests/test_layouts.py against the published sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import ModelLoadError

CONFIGS_DIR = Path(__file__).parent / "configs"


class UnsupportedLayoutError(ModelLoadError):
    """A model of an architecture DUGE does not edit."""


@dataclass(frozen=True)
class Layout:
    name: str  # "sd1" | "sd2" | "sdxl"
    title: str
    pipeline_class: str  # diffusers pipeline class name
    reference_config: str  # folder under duge/configs
    text_encoders: tuple[str, ...]  # pipeline component names
    tokenizers: tuple[str, ...]


SD1 = Layout("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", "sd15", ("text_encoder",), ("tokenizer",))
SD2 = Layout("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", "sd21", ("text_encoder",), ("tokenizer",))
SDXL = Layout("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", "sdxl",
              ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"))
LAYOUTS = {layout.name: layout for layout in (SD1, SD2, SDXL)}

# Single-file tensor names that identify a text-encoder layout (the same ones diffusers and
# ComfyUI test for).
SDXL_OPEN_CLIP_KEY = "conditioner.embedders.1.model.positional_embedding"
SDXL_REFINER_KEY = "conditioner.embedders.0.model.text_projection"
SD2_OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
UNET_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# Names that only other architectures have, for the error message.
FOREIGN_MARKERS = {
    "model.diffusion_model.joint_blocks.": "Stable Diffusion 3 (MMDiT)",
    "double_blocks.": "Flux",
    "model.diffusion_model.double_blocks.": "Flux",
}


def reference_config_dir(layout: str | Layout) -> Path:
    """The shipped diffusers config folder of a layout (configs only: no weights, no tokenizer)."""
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    return CONFIGS_DIR / layout.reference_config


def _layout_of(unet_config: dict, text_encoder_act: str | None, where: str) -> Layout:
    """SDXL by the UNet's size/crop conditioning; else SD 2.x if the text encoder is OpenCLIP (GELU), else SD 1.x.

    SD 1.x-style models of other widths (the built-in model) count as SD 1.x.
    """
    if unet_config.get("in_channels", 4) != 4:
        raise UnsupportedLayoutError(
            f"{where}: the UNet takes {unet_config['in_channels']} input channels (an inpainting or depth model); "
            "DUGE edits text-to-image models with 4 latent channels (SD 1.x, SD 2.x, SDXL)")
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        raise UnsupportedLayoutError(
            f"{where}: a UNet with {unet_config.get('addition_embed_type') or unet_config.get('class_embed_type')} "
            "conditioning (an upscaler, unCLIP or other variant); expected SD 1.x, SD 2.x or SDXL")
    return SD2 if text_encoder_act == "gelu" else SD1


def folder_layout(folder: str | Path) -> Layout:
    """The layout of a diffusers pipeline folder, from model_index.json and unet/config.json."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    pipeline = index.get("_class_name")
    known = {layout.pipeline_class for layout in LAYOUTS.values()}
    if pipeline not in known:
        raise UnsupportedLayoutError(
            f"'{folder / 'model_index.json'}' is a {pipeline}; expected one of {sorted(known)}")
    config_path = folder / "unet" / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"'{folder}' has no unet/config.json; expected a diffusers pipeline folder with a UNet")
    te_path = folder / "text_encoder" / "config.json"
    te_act = json.loads(te_path.read_text(encoding="utf-8")).get("hidden_act") if te_path.exists() else None
    layout = _layout_of(json.loads(config_path.read_text(encoding="utf-8")), te_act, str(config_path))
    if layout.pipeline_class != pipeline:
        raise UnsupportedLayoutError(
            f"'{folder}': model_index.json names {pipeline} but the UNet is {layout.title}'s")
    return layout


def single_file_layout(keys: Iterable[str], shapes: dict[str, list[int]] | None = None, where: str = "file") -> Layout:
    """The layout of a single-file checkpoint from its tensor names (and the UNet's conv_in shape)."""
    keys = set(keys)
    shapes = shapes or {}
    conv_in = shapes.get(UNET_CONV_IN_KEY)
    if conv_in is not None and conv_in[1] != 4:
        raise UnsupportedLayoutError(
            f"'{where}': the UNet takes {conv_in[1]} input channels (an inpainting or depth model); "
            "expected 4 (text-to-image SD 1.x, SD 2.x, SDXL)")
    if SDXL_OPEN_CLIP_KEY in keys:
        return SDXL
    if SDXL_REFINER_KEY in keys:
        raise UnsupportedLayoutError(f"'{where}' is an SDXL refiner (one OpenCLIP text encoder at conditioner.embedders.0); "
                                     "expected an SDXL base, SD 2.x or SD 1.x checkpoint")
    if SD2_OPEN_CLIP_KEY in keys:
        return SD2
    if any(k.startswith(SD1_CLIP_PREFIX) for k in keys):
        return SD1
    for marker, title in FOREIGN_MARKERS.items():
        if any(k.startswith(marker) for k in keys):
            raise UnsupportedLayoutError(f"'{where}' is a {title} checkpoint; DUGE edits SD 1.x, SD 2.x and SDXL")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UnsupportedLayoutError(f"'{where}' has no Stable Diffusion UNet (no model.diffusion_model.* tensors); "
                                     "expected an SD 1.x, SD 2.x or SDXL single-file checkpoint")
    raise UnsupportedLayoutError(f"'{where}' has a UNet but no text encoder DUGE recognises "
                                 f"(no {SD1_CLIP_PREFIX}*, {SD2_OPEN_CLIP_KEY} or {SDXL_OPEN_CLIP_KEY})")


def pipeline_layout(pipe) -> Layout:
    """The layout of a loaded pipeline."""
    act = getattr(pipe.text_encoder.config, "hidden_act", None) if getattr(pipe, "text_encoder", None) else None
    return _layout_of(dict(pipe.unet.config), act, f"{type(pipe).__name__}'s UNet")


def reduced_unet_config(config: dict, width_divisor: int) -> dict:
    """The UNet config with every block's channels divided by `width_divisor` (rounded to a multiple of 64,
    at least 64); block types, layers per block, transformer depths, head counts of SD 1.x (8 per layer)
    or head width of SD 2.x / SDXL (64) and the text/time conditioning sizes stay, so every module and
    key name is the full model's (and ComfyUI's model classes, which fix those head sizes, accept it)."""
    config = dict(config)
    channels = [max(64, round(c / width_divisor / 64) * 64) for c in config["block_out_channels"]]
    config["block_out_channels"] = channels
    if isinstance(config["attention_head_dim"], (list, tuple)):  # SD 2.x / SDXL: heads of 64 channels
        config["attention_head_dim"] = [c // 64 for c in channels]
    return config


def random_pipeline(layout: str | Layout, tokenizer_dir: str | Path, width_divisor: int = 1,
                    text_layers: int | None = None, seed: int = 0, meta: bool = False):
    """A pipeline of `layout` built from its reference configs with random weights (nothing downloaded).

    `width_divisor` > 1 narrows the UNet (`reduced_unet_config`); `text_layers` keeps only that many
    layers of each text encoder (their width, and so the UNet's cross-attention and pooled inputs,
    stay real); with either, the text encoders' vocabulary is the tokenizer's. The tokenizer is
    `tokenizer_dir` (a CLIP tokenizer folder) for every text encoder. The VAE's channels are divided
    too (at least 32). `meta=True`
    builds every module on the meta device (shapes only; for `duge plan`).
    """
    import diffusers  # deferred with torch, accelerate and transformers: layouts.py is read without them
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    folder = reference_config_dir(layout)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet_config = diffusers.UNet2DConditionModel.load_config(folder / "unet")
    if width_divisor > 1:
        unet_config = reduced_unet_config(unet_config, width_divisor)
    vae_config = diffusers.AutoencoderKL.load_config(folder / "vae")
    if width_divisor > 1:
        vae_config = dict(vae_config, block_out_channels=[max(32, c // width_divisor // 32 * 32)
                                                          for c in vae_config["block_out_channels"]])
    reduced = width_divisor > 1 or text_layers is not None
    torch.manual_seed(seed)
    with init_empty_weights() if meta else torch.device("cpu"):
        components = {
            "unet": diffusers.UNet2DConditionModel.from_config(unet_config),
            "vae": diffusers.AutoencoderKL.from_config(vae_config),
        }
        for name, tokenizer_name in zip(layout.text_encoders, layout.tokenizers):
            te_config = CLIPTextConfig.from_pretrained(folder / name)
            if text_layers is not None:
                te_config.num_hidden_layers = text_layers
            if reduced:
                te_config.vocab_size = len(tokenizer)
                te_config.max_position_embeddings = max(tokenizer.model_max_length, 1)
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            components[name] = cls(te_config).eval()
            components[tokenizer_name] = tokenizer
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    components["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    cls = getattr(diffusers, layout.pipeline_class)
    if layout.name == "sdxl":
        pipe = cls(**components, add_watermarker=False)
    else:
        pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

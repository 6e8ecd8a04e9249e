"""The built-in model as ComfyUI objects: MODEL (ModelPatcher), CLIP and VAE built from the diffusers
folder with ComfyUI's own classes, so that the stock CLIPTextEncode, KSampler, VAEDecode, LoraLoader
and CheckpointSave work on it (ComfyUI's checkpoint loader cannot detect a model this small).

- UNet: `DugeDemoModel`, a `supported_models_base.BASE` whose unet_config is what ComfyUI's own
  `model_detection.detect_unet_config` reads from the weights (converted to the LDM layout with
  `duge.keys`), with the heads of the diffusers config; SD 1.x latent format with the VAE's own
  scaling factor; SD's noise schedule (ComfyUI's default discrete schedule).
- CLIP: `SDClipModel` with the text encoder's config and an `SDTokenizer` reading the model's own
  tokenizer files (max length from the tokenizer config). ComfyUI's CLIP embedding always has
  49408 rows, so the token embedding is padded with zero rows (never used: the tokenizer cannot
  produce those ids) and trimmed again when a checkpoint is saved.
- VAE: ComfyUI's `AutoencoderKL` from a ddconfig matching the diffusers config (one downsampling
  for the built-in VAE), with `downscale_ratio`/`upscale_ratio` set to match, so VAEEncode and
  VAEDecode size images right. `EmptyLatentImage` always divides by 8: for the built-in model's
  16x16 latents (32x32 images) enter width = height = 128 there.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
from comfy import latent_formats, supported_models_base, utils

from .. import keys
from ..errors import ModelLoadError
from ..safe_weights import load_tensors
from ..world.model import BUILTIN_MODEL_DIR

CLIP_EMBEDDING_ROWS = 49408  # comfy.clip_model.CLIPEmbeddings' fixed vocabulary size
# What a user enters in EmptyLatentImage for the built-in model's latents (it divides by 8).
EMPTY_LATENT_PIXELS_PER_LATENT = 8


class DugeDemoModel(supported_models_base.BASE):
    """ComfyUI model config of the built-in model (an SD 1.x-architecture UNet of another size)."""

    unet_config: dict = {}
    unet_extra_config = {"num_heads": 4, "num_head_channels": -1}
    latent_format = latent_formats.SD15
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]

    def __init__(self, unet_config: dict, num_heads: int, scale_factor: float, latent_size: int,
                 vocab_size: int, clip_target: supported_models_base.ClipTarget | None = None):
        super().__init__(unet_config)
        self.unet_config["num_heads"] = num_heads
        self.unet_config["num_head_channels"] = -1
        self.latent_format = latent_formats.SD15(scale_factor=scale_factor)
        self.duge_latent_size = latent_size  # read by duge.backends.comfy_backend.default_latent_size
        self.vocab_size = vocab_size
        self._clip_target = clip_target

    def clip_target(self, state_dict={}):
        return self._clip_target

    def process_clip_state_dict_for_saving(self, state_dict):
        state_dict = dict(state_dict)
        for key in ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale"):
            state_dict.pop(key, None)
        embedding = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
        if embedding in state_dict:
            state_dict[embedding] = state_dict[embedding][: self.vocab_size]
        return utils.state_dict_prefix_replace(state_dict, {"clip_l.": "cond_stage_model."})


def is_demo_model(model) -> bool:
    """True for a MODEL built by `load_demo_model` (or a clone / edit of one)."""
    return isinstance(getattr(getattr(model, "model", None), "model_config", None), DugeDemoModel)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read '{path}': {err}") from err


def _heads(unet_config: dict) -> int:
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim")
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise ModelLoadError(f"UNet heads per block {heads}: ComfyUI's UNet takes one number of heads")
        heads = heads[0]
    return int(heads)


def _clip_target(folder: Path, te_config: dict, max_length: int) -> supported_models_base.ClipTarget:
    tokenizer = functools.partial(
        comfy.sd1_clip.SDTokenizer, tokenizer_path=str(folder / "tokenizer"), max_length=max_length,
        embedding_size=te_config["hidden_size"], embedding_key="clip_l",
    )
    special = {"start": te_config["bos_token_id"], "end": te_config["eos_token_id"], "pad": te_config["pad_token_id"]}
    text_model = functools.partial(
        comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(te_config), max_length=max_length,
        special_tokens=special, return_projected_pooled=False,
    )
    return supported_models_base.ClipTarget(
        functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tokenizer),
        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=text_model),
    )


def load_demo_model(folder: str | Path | None = None):
    """(MODEL, CLIP, VAE) of the diffusers folder `folder` (default: the built-in model) in ComfyUI's classes."""
    folder = Path(folder) if folder is not None else BUILTIN_MODEL_DIR
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (folder / part).is_dir():
            raise ModelLoadError(f"'{folder}' has no '{part}' folder; expected a diffusers Stable Diffusion folder")
    unet_config = _read_json(folder / "unet" / "config.json")
    vae_config = _read_json(folder / "vae" / "config.json")
    te_config = _read_json(folder / "text_encoder" / "config.json")
    tokenizer_config = _read_json(folder / "tokenizer" / "tokenizer_config.json")
    max_length = int(tokenizer_config.get("model_max_length", te_config["max_position_embeddings"]))

    # Weights are built outside inference mode so that training can use them in autograd.
    with torch.inference_mode(False):
        unet_sd = keys.unet_to_ldm(load_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config)
        detected = comfy.model_detection.detect_unet_config(unet_sd, keys.LDM_UNET_PREFIX)
        vocab_size = int(te_config["vocab_size"])
        config = DugeDemoModel(detected, _heads(unet_config), float(vae_config.get("scaling_factor", 0.18215)),
                               int(unet_config["sample_size"]), vocab_size, _clip_target(folder, te_config, max_length))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, "", device=mm.unet_offload_device())
        unet_state = {k[len(keys.LDM_UNET_PREFIX):]: v for k, v in unet_sd.items()}
        _load_exact(base.diffusion_model, unet_state, "UNet", folder)
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())

        clip = comfy.sd.CLIP(config.clip_target(), parameters=0, model_options={"dtype": torch.float32})
        te_state = keys.text_encoder_to_ldm(load_tensors(folder / "text_encoder" / "model.safetensors"))
        te_state = {"clip_l." + k[len("cond_stage_model."):]: v for k, v in te_state.items()}
        embedding = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
        rows = te_state[embedding]
        padded = torch.zeros(CLIP_EMBEDDING_ROWS, rows.shape[1], dtype=rows.dtype)
        padded[: rows.shape[0]] = rows
        te_state[embedding] = padded
        projection = "clip_l.transformer.text_projection.weight"
        width = te_config["hidden_size"]
        te_state[projection] = torch.eye(te_config.get("projection_dim", width), width)  # unused (unprojected pooled)
        te_state["clip_l.logit_scale"] = torch.tensor(4.6055)
        _load_exact(clip.cond_stage_model, te_state, "text encoder", folder)

        vae_state = keys.vae_to_ldm(load_tensors(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_config)
        vae_state = {k[len(keys.LDM_VAE_PREFIX):]: v for k, v in vae_state.items()}
        channels = list(vae_config["block_out_channels"])
        ddconfig = {
            "double_z": True, "z_channels": vae_config["latent_channels"], "resolution": vae_config.get("sample_size", 256),
            "in_channels": vae_config.get("in_channels", 3), "out_ch": vae_config.get("out_channels", 3),
            "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
            "num_res_blocks": vae_config["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
        }
        vae = comfy.sd.VAE(sd=vae_state, config={"params": {"ddconfig": ddconfig, "embed_dim": vae_config["latent_channels"]}})
        ratio = 2 ** (len(channels) - 1)
        vae.downscale_ratio = ratio
        vae.upscale_ratio = ratio
        vae.latent_channels = vae_config["latent_channels"]
    return model, clip, vae


def _load_exact(module: torch.nn.Module, state: dict, what: str, folder: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"'{folder}': the {what} weights do not fit ComfyUI's {what}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )

"""A Stable Diffusion 1.5-layout single-file checkpoint with random weights, for tests that load it
the way a user's checkpoint is loaded (ComfyUI's CheckpointLoaderSimple, A1111).

The UNet, VAE and text encoder are built from the published SD 1.5 configs shipped in
duge/configs/sd15 with diffusers' / transformers' own random initialisation (seeded), converted
to the original single-file names with `duge.keys`, and written as one .safetensors file
(float16 by default: 2 GB instead of 4). No weight of a real model is involved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sd15_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the checkpoint to `path`; returns `path`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from duge import keys
    from duge.layouts import reference_config_dir

    folder = reference_config_dir("sd1")
    read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def add(converted: dict[str, torch.Tensor]) -> None:
        for key, tensor in converted.items():
            tensor = tensor.detach()
            state[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()

    unet = UNet2DConditionModel.from_config(read("unet"))
    add(keys.unet_to_ldm(unet.state_dict(), unet.config))
    del unet
    vae = AutoencoderKL.from_config(read("vae"))
    add(keys.vae_to_ldm(vae.state_dict(), vae.config))
    del vae
    text_encoder = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))
    add(keys.text_encoder_to_ldm(text_encoder.state_dict()))
    del text_encoder
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path

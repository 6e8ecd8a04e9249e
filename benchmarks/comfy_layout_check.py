"""ComfyUI's side of benchmarks/real_layouts.py: run in ComfyUI's Python with COMFYUI_PATH set.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_layout_check.py --layout sd1|sd2|sdxl \
        --checkpoint model.safetensors --lora lora.safetensors

Builds ComfyUI's own model for the layout from the UNet config ComfyUI detects in the checkpoint
(`model_detection.detect_unet_config`, so reduced-width test models work too), loads the
checkpoint's UNet weights as its checkpoint loader does (what `BaseModel.load_model_weights` does, keeping
its missing and unexpected key lists) and applies the LoRA as LoraLoader does (`comfy.sd.load_lora_for_models`, which
logs every LoRA key it cannot place). Prints one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True, choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--lora", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    records = _Records()
    logging.getLogger().addHandler(records)
    prefix = "model.diffusion_model."
    state = comfy.utils.load_torch_file(args.checkpoint)
    unet_config = comfy.model_detection.detect_unet_config(state, prefix)
    model_class = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                   "sdxl": comfy.supported_models.SDXL}[args.layout]
    config = model_class(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state, prefix)
    # What BaseModel.load_model_weights does, keeping the missing/unexpected lists it only logs.
    unet_state = config.process_unet_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    missing, unexpected = model.diffusion_model.load_state_dict(unet_state, strict=False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    lora = comfy.utils.load_torch_file(args.lora)
    before = len(records.messages)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    lora_messages = records.messages[before:]
    not_loaded = sum("lora key not loaded" in m or "NOT LOADED" in m for m in lora_messages)
    modules = len({k.split(".")[0] for k in lora})
    print(json.dumps({"unet_missing": len(missing), "unet_unexpected": len(unexpected), "lora_not_loaded": not_loaded,
                      "lora_modules": modules, "patches": len(patched.patches)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in model: where it lives, how it is assembled and how it samples."""

from __future__ import annotations

from pathlib import Path

import torch

from .architecture import scheduler_config

BUILTIN = "builtin"  # the name that selects the built-in model (CLI --model, manifests' base_model)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_MODEL_DIR = WEIGHTS_DIR / "tiny-sd"
EVALUATOR_PATH = WEIGHTS_DIR / "evaluator.safetensors"

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


def assemble_pipeline(unet, text_encoder, vae, tokenizer, scheduler=None):
    """A `StableDiffusionPipeline` from the built-in model's parts (no safety checker: synthetic world)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # deferred: diffusers takes seconds to import

    if scheduler is None:
        scheduler = DDIMScheduler(**scheduler_config())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] for `prompts`; image i uses the generator seeded `seed + i`."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="pt",
    )
    return out.images.float().clamp(0, 1).cpu()

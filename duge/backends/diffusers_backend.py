"""Backend for diffusers `StableDiffusionPipeline` models: the built-in one, a diffusers folder,
or a single-file SD checkpoint loaded with a local config (see `duge.models.load_pipeline`).

Edits are installed on the UNet's linear layers with `torch.nn.utils.parametrize` and removed
in `finally`, leaving the host pipeline's weights bit-identical.
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager

import torch
from torch.nn.utils import parametrize

from ..attention import capture_cross_attention, list_cross_attention_layers, token_indices_for
from ..edits import DeltaWeight, LayerEdits

logger = logging.getLogger(__name__)


def choose_attention_implementation(unet, device: torch.device) -> str:
    """Use xformers on CUDA when it imports, else PyTorch SDPA (diffusers' default). Returns the choice."""
    if device.type == "cuda":
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
            logger.info("attention: xformers memory-efficient attention")
            return "xformers"
        except Exception as err:  # not installed, or built for another torch/CUDA
            logger.info("attention: xformers unavailable (%s); using PyTorch SDPA", err)
            return "sdpa"
    logger.info("attention: PyTorch SDPA (device %s; xformers is used only on CUDA)", device.type)
    return "sdpa"


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast: 'auto' = bf16 on CUDA with bf16 support, else fp16 on CUDA, fp32 on CPU."""
    if requested == "float32" or device.type != "cuda":
        if requested not in ("auto", "float32"):
            logger.info("dtype %s requested but device is %s: falling back to float32", requested, device.type)
        return torch.float32
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


class DiffusersBackend:
    """The backend interface (duge.backends.base.Backend) over a diffusers SD pipeline."""

    def __init__(self, pipe, device: str | torch.device | None = None, dtype: str = "auto"):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.device = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        pipe.to(self.device)
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.vae = pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.compute_dtype = choose_dtype(dtype, self.device)
        self.attention_implementation = choose_attention_implementation(self.unet, self.device)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        for module in (self.unet, self.text_encoder, self.vae):
            module.requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[B, tokens, dim] last hidden states of the frozen text encoder; cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0]
            for prompt, h in zip(missing, hidden):
                self._prompt_cache[prompt] = h
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def token_indices(self, prompts, words, eos_fallback=False):
        indices, mask = token_indices_for(self.tokenizer, prompts, words, eos_fallback=eos_fallback)
        return indices.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------- diffusion
    def add_noise(self, latents, noise, timesteps):
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def predict_noise(self, noisy, timesteps, context):
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            out = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return out.float()

    @torch.no_grad()
    def sample_latents(self, prompts, seed, steps, guidance):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        out = self.pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                        generator=generators, output_type="latent")
        return out.images.float()

    @torch.no_grad()
    def decode(self, latents):
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def generate(self, prompts, seed, steps, guidance):
        """Images [B, 3, H, W] in [0, 1]."""
        return self.decode(self.sample_latents(prompts, seed, steps, guidance))

    # ---------------------------------------------------------------- structure
    def cross_attention_layers(self) -> list[str]:
        return list_cross_attention_layers(self.unet)

    def trainable_linears(self, pattern: str) -> dict[str, torch.nn.Linear]:
        regex = re.compile(pattern)
        found = {name: m for name, m in self.unet.named_modules()
                 if isinstance(m, torch.nn.Linear) and regex.search(name)}
        if not found:
            raise ValueError(f"no linear layer of the UNet matches the trainable pattern {pattern!r}")
        return found

    def capture_attention(self, layers, token_indices):
        return capture_cross_attention(self.unet, layers, token_indices)

    # ---------------------------------------------------------------- edits
    @contextmanager
    def edits(self, pattern: str, mode: str = "full", rank: int = 4):
        """Install a `DeltaWeight` on every matching linear layer; always removed on exit."""
        linears = self.trainable_linears(pattern)
        installed: list[torch.nn.Module] = []
        deltas: dict[str, DeltaWeight] = {}
        try:
            for name, module in linears.items():
                delta = DeltaWeight(module.weight, mode=mode, rank=rank)
                parametrize.register_parametrization(module, "weight", delta, unsafe=True)
                installed.append(module)
                deltas[name] = delta
            originals = {name: m.parametrizations.weight.original for name, m in linears.items()}
            yield LayerEdits(deltas, originals)
        finally:
            for module in installed:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    def edited_pipeline(self, deltas: dict[str, torch.Tensor]):
        """A new pipeline whose UNet is a copy of the host's with `deltas` added; the host is untouched."""
        from diffusers import StableDiffusionPipeline

        unet = copy.deepcopy(self.unet)
        modules = dict(unet.named_modules())
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = modules[name].weight
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        components = dict(self.pipe.components)
        components["unet"] = unet
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

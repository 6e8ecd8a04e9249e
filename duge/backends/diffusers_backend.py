"""Backend for diffusers pipelines of SD 1.x, SD 2.x (v-prediction) and SDXL: the built-in model, a
diffusers folder, or a single-file checkpoint loaded with a local config (see `duge.models.load_pipeline`).

Edits are installed on the UNet's linear layers with `torch.nn.utils.parametrize` and removed
in `finally`, leaving the host pipeline's weights bit-identical. SDXL's conditioning is a
`TextConditioning` (hidden states of both text encoders, concatenated, and the pooled embedding);
its size/crop time ids are built from the latent size of each UNet call.

Run-time choices, each logged: attention implementation (`choose_attention_implementation`), compute
dtype for autocast (`choose_dtype`; trainable deltas stay float32), gradient checkpointing.
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.utils import parametrize

from ..attention import capture_cross_attention, list_cross_attention_layers, token_indices_for
from ..conditioning import TextConditioning
from ..edits import DeltaWeight, LayerEdits
from ..errors import DugeError
from ..plan import unet_activation_elements
from .base import image_seeds, module_fingerprint

logger = logging.getLogger(__name__)


def choose_attention_implementation(unet, device: torch.device) -> str:
    """Use xformers on CUDA when it imports, else PyTorch SDPA (diffusers' default). Returns the choice."""
    if device.type == "cuda":
        try:
            import xformers  # noqa: F401  # deferred: optional, and only on CUDA

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
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        logger.info("autocast: %s on CUDA (trainable deltas stay float32)", str(chosen).removeprefix("torch."))
        return chosen
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


def storage_dtype(requested: str) -> torch.dtype:
    """The dtype to load the frozen weights in: the autocast dtype on CUDA (halves their memory), else float32."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return choose_dtype(requested, device)


def checkpoint_keeping_processors(module: torch.nn.Module, *args):
    """diffusers' gradient-checkpointing function (torch.utils.checkpoint, non-reentrant), except that the
    recomputation in the backward pass runs the attention processors the forward pass ran.

    The trainer captures cross-attention maps with temporary processors (`duge.attention`), which are
    gone by the time of the backward pass; recomputing with the model's own processors would save a
    different set of tensors than the forward did, which torch.utils.checkpoint rejects.
    """
    from diffusers.models.attention_processor import Attention  # deferred: diffusers takes seconds to import

    forward_processors = {m: m.processor for m in module.modules() if isinstance(m, Attention)}

    @contextmanager
    def as_in_forward():
        current = {m: m.processor for m in forward_processors}
        for m, processor in forward_processors.items():
            m.processor = processor
        try:
            yield
        finally:
            for m, processor in current.items():
                m.processor = processor

    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), as_in_forward()))


class DiffusersBackend:
    """The backend interface (duge.backends.base.Backend) over a diffusers SD 1.x / 2.x / XL pipeline.

    `resolution`: image size in pixels of the images the backend generates (default: the UNet's
    `sample_size` times the VAE factor, e.g. 512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL).
    `gradient_checkpointing`: recompute each UNet block in the backward pass instead of keeping its
    activations (diffusers' `enable_gradient_checkpointing`; see `duge.plan` for the memory saved).
    """

    def __init__(self, pipe, device: str | torch.device | None = None, dtype: str = "auto",
                 gradient_checkpointing: bool = False, resolution: int | None = None):
        from diffusers import DDPMScheduler  # deferred: diffusers takes seconds to import

        self.pipe = pipe
        self.device = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        pipe.to(self.device)
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)  # SDXL's second (pooled) text encoder
        self.tokenizer = pipe.tokenizer
        self.vae = pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = resolution
        self.compute_dtype = choose_dtype(dtype, self.device)
        self.attention_implementation = choose_attention_implementation(self.unet, self.device)
        self.gradient_checkpointing = False
        self.set_gradient_checkpointing(gradient_checkpointing is True)
        logger.info("model: %s, prediction %s, compute dtype %s", type(pipe).__name__, self.prediction_type,
                    str(self.compute_dtype).removeprefix("torch."))
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for module in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if module is not None:
                module.requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)

    def set_gradient_checkpointing(self, enabled: bool) -> bool:
        """diffusers' `enable_gradient_checkpointing` (through `checkpoint_keeping_processors`) or its
        `disable_gradient_checkpointing`; returns the previous setting."""
        previous = self.gradient_checkpointing
        if enabled:
            self.unet.enable_gradient_checkpointing(checkpoint_keeping_processors)
            if not previous:
                logger.info("gradient checkpointing: on (each UNet block is recomputed in the backward pass)")
        elif getattr(self.unet, "is_gradient_checkpointing", False):
            self.unet.disable_gradient_checkpointing()
        self.gradient_checkpointing = bool(enabled)
        return previous

    def gradient_checkpointing_ratio(self) -> float | None:
        """Activations per row with checkpointing over without, from `duge.plan`'s count for this UNet
        at the latent size it trains at."""
        pixels = self.resolution or self.unet.config.sample_size * self.vae_scale_factor
        latent = (pixels // self.vae_scale_factor, pixels // self.vae_scale_factor)
        counts = unet_activation_elements(dict(self.unet.config), latent, self.tokenizer.model_max_length)
        return (counts.checkpointed + counts.largest_block) / counts.full

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | TextConditioning:
        """[B, tokens, dim] last hidden states of the frozen text encoder, cached per prompt; for SDXL a
        `TextConditioning` (both encoders' penultimate hidden states [B, 77, 2048] and the pooled [B, 1280])."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing and self.text_encoder_2 is not None:
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompt=missing, device=self.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            for prompt, h, p in zip(missing, hidden, pooled):
                self._prompt_cache[prompt] = (h, p)
        elif missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0]
            for prompt, h in zip(missing, hidden):
                self._prompt_cache[prompt] = (h, None)
        hidden = torch.stack([self._prompt_cache[p][0] for p in prompts])
        if self.text_encoder_2 is None:
            return hidden
        return TextConditioning(hidden, torch.stack([self._prompt_cache[p][1] for p in prompts]))

    # ---------------------------------------------------------------- tokens (for duge.attacks)
    def _require_single_text_encoder(self) -> None:
        if self.text_encoder_2 is not None:
            raise DugeError("attacks on token embeddings support models with one text encoder (SD 1.x, SD 2.x); "
                            "this model has two (SDXL)")

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """The tokenizer's ids of `prompt`, start and end tokens included, without padding."""
        return list(self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids)

    def pad_token_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Rows of ids (each start ... end) padded as the tokenizer pads, to its model_max_length: [B, tokens]."""
        length = self.tokenizer.model_max_length
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if any(len(row) > length for row in rows):
            raise DugeError(f"a prompt of {max(len(r) for r in rows)} tokens does not fit the text encoder's "
                            f"{length}; use fewer attack tokens or a shorter prompt")
        return torch.tensor([row + [pad] * (length - len(row)) for row in rows], device=self.device)

    def special_token_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

    def decode_token_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_embedding_table(self) -> torch.Tensor:
        """The text encoder's input embedding of every token id: [vocabulary, dim]."""
        self._require_single_text_encoder()
        return self.text_encoder.get_input_embeddings().weight

    def encode_tokens(self, ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The text encoder's hidden states [B, tokens, dim] for ids [B, tokens], as `encode_prompts` gives for
        the same ids; with `token_embeddings` [B, tokens, dim] those replace the input embeddings of the ids
        (a forward hook on the embedding layer), and gradients flow back to them."""
        self._require_single_text_encoder()
        layer = self.text_encoder.get_input_embeddings()
        handle = None
        if token_embeddings is not None:
            handle = layer.register_forward_hook(lambda module, args, output: token_embeddings.to(output.dtype))
        try:
            return self.text_encoder(ids.to(self.device))[0]
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def generate_from_context(self, context: torch.Tensor, seed: int, steps: int, guidance: float) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] sampled from text hidden states [B, tokens, dim] (image i: seed + i),
        with the empty prompt as the unconditional input, as `generate` samples a typed prompt."""
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(context))]
        size = {"height": self.resolution, "width": self.resolution} if self.resolution else {}
        out = self.pipe(prompt_embeds=context.to(self.text_encoder.dtype), num_inference_steps=steps,
                        guidance_scale=guidance, generator=generators, output_type="latent", **size)
        return self.decode(out.images.float())

    def token_indices(self, prompts, words, eos_fallback=False):
        indices, mask = token_indices_for(self.tokenizer, prompts, words, eos_fallback=eos_fallback)
        return indices.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------- diffusion
    def add_noise(self, latents, noise, timesteps):
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's size/crop conditioning [B, 6] for latents [B, C, h, w]: original size (H, W), crop (0, 0),
        target size (H, W), in pixels — what the pipeline passes when it generates at that size."""
        height, width = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=latents.dtype, device=latents.device)
        return ids.expand(latents.shape[0], 6)

    def predict_noise(self, noisy, timesteps, context):
        extra = {}
        if isinstance(context, TextConditioning):
            extra["added_cond_kwargs"] = {"text_embeds": context.pooled, "time_ids": self.time_ids(noisy)}
            context = context.hidden
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            out = self.unet(noisy, timesteps, encoder_hidden_states=context, **extra).sample
        return out.float()

    @torch.no_grad()
    def sample_latents(self, prompts, seed, steps, guidance, on_step=None):
        """Latents [B, C, h, w] for `prompts`: image i from seed `seed + i`, or `seed[i]` for a list of seeds.

        Each prompt is encoded once per backend (`encode_prompts`' cache, the empty negative prompt
        included). `on_step()` is called after every sampler step of the batch."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in image_seeds(seed, len(prompts))]
        size = {"height": self.resolution, "width": self.resolution} if self.resolution else {}
        callback = {}
        if on_step is not None:
            def step_end(pipe, step, timestep, tensors):
                on_step()
                return tensors

            callback["callback_on_step_end"] = step_end
        out = self.pipe(num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                        output_type="latent", **self._pipeline_text(list(prompts), guidance), **size, **callback)
        return out.images.float()

    def _pipeline_text(self, prompts: list[str], guidance: float) -> dict:
        """The pipeline's text arguments: SD 1.x/2.x embeddings from `encode_prompts`' cache (the empty
        negative prompt's too, as the pipeline would encode it); SDXL's prompts as they are (its pipeline
        zeroes the empty negative prompt's embedding instead of encoding it)."""
        if self.text_encoder_2 is not None:
            return {"prompt": prompts}
        text = {"prompt_embeds": self.encode_prompts(prompts).to(self.unet.dtype)}
        if guidance > 1:
            text["negative_prompt_embeds"] = self.encode_prompts([""] * len(prompts)).to(self.unet.dtype)
        return text

    @torch.no_grad()
    def decode(self, latents):
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def generate(self, prompts, seed, steps, guidance, on_step=None):
        """Images [B, 3, H, W] in [0, 1] (seeds as in `sample_latents`)."""
        return self.decode(self.sample_latents(prompts, seed, steps, guidance, on_step=on_step))

    # ---------------------------------------------------------------- structure
    def fingerprint(self) -> str:
        """The UNet's state (its parametrisations hold W0 and the committed deltas), sampled (`module_fingerprint`),
        and the size of the images it generates."""
        return f"{module_fingerprint(self.unet)}@{self.resolution or 'default'}"

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
        unet = copy.deepcopy(self.unet)
        if getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        modules = dict(unet.named_modules())
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = modules[name].weight
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        components = dict(self.pipe.components)
        components["unet"] = unet
        extra = {"requires_safety_checker": False} if self.text_encoder_2 is None else {}
        pipe = type(self.pipe)(**components, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

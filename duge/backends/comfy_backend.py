"""Backend for ComfyUI's MODEL (a `ModelPatcher`) and CLIP: the trainer's interface over the host's
own mechanisms, so that the model a user loaded in ComfyUI is unlearned without being reloaded.

- **Edits**: every trainable layer gets a `duge.edits.DeltaWeight` as a *weight wrapper*
  (`ModelPatcher.add_weight_wrapper`) on a `clone()` of the incoming patcher. ComfyUI applies
  wrappers at forward time (`comfy.ops.cast_bias_weight`); the shared `nn.Module` is never written.
  On exit the training clone is unloaded and the wrappers are taken off the modules, also after an
  error or a Cancel (`InterruptProcessingException`). The result of a run is
  `edited_model(total_delta)`: another clone of the incoming patcher with the deltas as weight
  patches (`("diff", (delta,))`), which the stock KSampler, LoRA loaders and checkpoint savers use.
- **Names**: layers are named in the diffusers layout (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`),
  mapped from ComfyUI's keys (`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight`)
  with ComfyUI's own `comfy.utils.unet_to_diffusers`, so the trainer's deltas, the LoRA exporter
  (`duge.io.save_lora`, kohya names) and ComfyUI's LoraLoader all use one naming.
- **Noise**: from the model's own `model_sampling` (object patches honoured). A trainer timestep
  t ∈ [0, 1000) is the sigma `model_sampling.sigma(t)`; `add_noise` returns
  `calculate_input(σ, noise_scaling(σ, ε, x0))` = √ᾱ·x0 + √(1−ᾱ)·ε, the input the UNet sees, exactly
  what diffusers' `DDPMScheduler.add_noise` gives; `predict_noise` returns the UNet's raw output, ε
  for EPS models and v for V_PREDICTION ones — the same parametrisation as the diffusers backend,
  so the losses compare like with like. Other parametrisations (EDM, flow, x0) are refused.
- **Text**: CLIP's own `tokenize` / `encode_from_tokens` (prompt weighting and embeddings as the
  user's CLIPTextEncode would see them); token positions come from the same tokenizer's output.
- **Attention capture**: the host's hook, `transformer_options["patches_replace"]["attn2"]`
  (what `ModelPatcher.set_model_attn2_replace` registers), only on the captured layers, passed with
  the direct `diffusion_model` call. Other layers keep ComfyUI's optimized attention.

Tensors handed over by other nodes are inference tensors (the executor runs under
`torch.inference_mode()`); the backend clones what autograd must keep, and `training_mode()` gives
the `torch.inference_mode(False)` + `enable_grad` context a node runs the trainer in.

Importing this module needs ComfyUI on `sys.path` (it is only imported by the node pack and by
tests that have ComfyUI).
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.sample
import comfy.utils

from ..attention import CrossAttentionStore, selected_token_probabilities, token_indices_for
from ..edits import DeltaWeight, LayerEdits
from ..errors import DugeError
from .base import image_seeds, module_fingerprint
from .diffusers_backend import choose_dtype

logger = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model."


def prediction_type_of(model_sampling) -> str:
    """'epsilon' or 'v_prediction' for a ComfyUI model_sampling object; DugeError for other kinds."""
    ms = comfy.model_sampling
    if isinstance(model_sampling, (ms.EDM, ms.X0)) or not isinstance(model_sampling, ms.EPS):
        raise DugeError(
            f"the model predicts with {type(model_sampling).__name__}; DUGE supports epsilon- and "
            "v-prediction UNets (Stable Diffusion 1.x, 2.x, XL)"
        )
    return "v_prediction" if isinstance(model_sampling, ms.V_PREDICTION) else "epsilon"


def unet_layer_names(model_patcher) -> dict[str, str]:
    """diffusers module path -> ComfyUI module path (with `diffusion_model.`) for every UNet weight."""
    unet_config = model_patcher.model.model_config.unet_config
    mapping = comfy.utils.unet_to_diffusers(unet_config)  # {diffusers key: ldm key}
    if not mapping:
        raise DugeError(
            f"{type(model_patcher.model).__name__} is not a UNet model in the Stable Diffusion layout; "
            "DUGE edits SD 1.x, 2.x and XL UNets"
        )
    names = {}
    for diffusers_key, ldm_key in mapping.items():
        if diffusers_key.endswith(".weight"):
            names[diffusers_key[: -len(".weight")]] = UNET_PREFIX + ldm_key[: -len(".weight")]
    return names


def attn2_block_key(comfy_module: str) -> tuple[str, int, int] | None:
    """The `patches_replace["attn2"]` key of a ComfyUI attn2 module path, e.g.
    `diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2` -> ("input", 4, 0)."""
    match = re.fullmatch(
        r"(?:diffusion_model\.)?(input_blocks|middle_block|output_blocks)(?:\.(\d+))?\.\d+\.transformer_blocks\.(\d+)\.attn2",
        comfy_module,
    )
    if match is None:
        return None
    part, number, index = match.groups()
    block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[part]
    return (block, int(number) if block != "middle" else 0, int(index))


def differentiable_attention(default_attention, *args, **kwargs):
    """ComfyUI's `optimized_attention_override` hook while gradients are needed: its own PyTorch
    SDPA attention instead of the host's choice. On the CPU ComfyUI picks sub-quadratic attention,
    which exponentiates in place (`torch.exp(..., out=...)`) and cannot be differentiated; SDPA
    can, and it is what ComfyUI itself uses on most GPUs. ComfyUI versions without the hook ignore
    the key (they then train with whatever attention they chose).
    """
    from comfy.ldm.modules.attention import attention_pytorch  # deferred: ComfyUI's attention module, when a step runs

    return attention_pytorch(*args, **kwargs)

class _Attn2Capture:
    """`patches_replace["attn2"]` hook of one captured layer: ComfyUI's optimized attention for the
    output, plus the probabilities of the store's token columns (gradients flow through both)."""

    def __init__(self, store: CrossAttentionStore, layer_name: str):
        self.store = store
        self.layer_name = layer_name

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention  # deferred: ComfyUI's attention module, when a step runs

        heads = extra_options["n_heads"]
        dim_head = extra_options["dim_head"]
        batch = q.shape[0]
        # [batch, heads, tokens, dim_head]
        qh = q.reshape(batch, -1, heads, dim_head).transpose(1, 2).float()
        kh = k.reshape(k.shape[0], -1, heads, dim_head).transpose(1, 2).float()
        if kh.shape[0] != batch:
            kh = kh.expand(batch, -1, -1, -1)
        # [batch, heads, query_tokens, selected_text_tokens]
        self.store.maps[self.layer_name] = selected_token_probabilities(
            qh, kh, self.store.token_indices, 1 / math.sqrt(dim_head)
        )
        precision = extra_options.get("attn_precision")
        if torch.is_grad_enabled():
            return differentiable_attention(attention.optimized_attention, q, k, v, heads, attn_precision=precision)
        return attention.optimized_attention(q, k, v, heads, attn_precision=precision)


class _ClipTokenizerView:
    """The part of a Hugging Face tokenizer's interface `duge.attention.token_indices_for` uses, over
    a ComfyUI CLIP's own tokenizer: ids exactly as `CLIP.tokenize` makes them (all 75-token chunks,
    flattened in the order the encoded conditioning has them; the "l" encoder's for SDXL)."""

    def __init__(self, clip):
        self.clip = clip
        tokens = clip.tokenize("")
        self.key = "l" if "l" in tokens else next(iter(tokens))
        tokenizer = getattr(clip.tokenizer, f"clip_{self.key}", None) or getattr(clip.tokenizer, self.key, None)
        self.eos_token_id = getattr(tokenizer, "end_token", None)
        self.bos_token_id = getattr(tokenizer, "start_token", None)
        self.model_max_length = None  # CLIP.tokenize chunks long prompts instead of truncating

    def __call__(self, text: str, add_special_tokens: bool = True, **_):
        ids = [int(t[0]) if not torch.is_tensor(t[0]) else -1 for chunk in self.clip.tokenize(text)[self.key] for t in chunk]
        if not add_special_tokens:
            if self.bos_token_id is not None and ids and ids[0] == self.bos_token_id:
                ids = ids[1:]
            if self.eos_token_id is not None and self.eos_token_id in ids:
                ids = ids[: ids.index(self.eos_token_id)]
        return {"input_ids": ids}


@contextmanager
def training_mode():
    """What a node wraps a training run in: autograd on, outside the executor's inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _throw_if_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


def _unload(patcher) -> None:
    """Unload `patcher` if ComfyUI has it loaded (restores the module's weights and cast flags)."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            mm.current_loaded_models.pop(i).model_unload()


class ComfyBackend:
    """The backend interface (duge.backends.base.Backend) over a ComfyUI MODEL and CLIP (+ VAE for images).

    `latent_size` (h, w) is the size of generated latents; None takes the model's own
    (`default_latent_size`). `sampler_name` / `scheduler` are KSampler's names. `dtype` is the
    compute dtype for training ('auto': bf16/fp16 on CUDA, float32 on CPU); deltas stay float32.
    The incoming `model` is never changed: all work happens on clones of it.
    """

    def __init__(self, model, clip, vae=None, latent_size: tuple[int, int] | None = None,
                 sampler_name: str = "euler", scheduler: str = "normal", dtype: str = "auto",
                 interruptible: bool = True):
        if clip is None:
            raise DugeError("a CLIP is needed to encode the prompts; connect the CLIP that belongs to the model")
        self.incoming = model
        self.patcher = model.clone()  # the working patcher; training wrappers live on it only
        self.clip = clip
        self.vae = vae
        self.device = torch.device(self.patcher.load_device)
        self.model_sampling = self.patcher.get_model_object("model_sampling")
        self.prediction_type = prediction_type_of(self.model_sampling)
        self.num_train_timesteps = int(self.model_sampling.sigmas.shape[0])
        self.compute_dtype = choose_dtype(dtype, self.device)
        self.latent_format = self.patcher.get_model_object("latent_format")
        self.latent_channels = int(getattr(self.latent_format, "latent_channels", 4))
        self.latent_size = tuple(latent_size) if latent_size else default_latent_size(model)
        self.sampler_name = sampler_name
        self.scheduler = scheduler
        self.interruptible = interruptible
        self.layer_names = unet_layer_names(self.patcher)  # diffusers path -> comfy path
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._adm_channels = int(getattr(self.patcher.model, "adm_channels", 0) or 0)
        self._capture_options: dict | None = None  # transformer_options while capture_attention is open
        self._edit_deltas: dict[str, DeltaWeight] = {}  # the installed edits while `edits` is open

    # ---------------------------------------------------------------- loading
    def _load(self) -> None:
        mm.load_models_gpu([self.patcher], force_full_load=True)

    def _check_interrupt(self) -> None:
        if self.interruptible:
            _throw_if_interrupted()

    # ---------------------------------------------------------------- text
    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt not in self._prompt_cache:
            with torch.inference_mode(False), torch.no_grad():
                out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
                cond = out["cond"][0].to(self.device, torch.float32).clone()  # [tokens, dim]
                pooled = out.get("pooled_output")
                pooled = None if pooled is None else pooled[0].to(self.device, torch.float32).clone()
            self._prompt_cache[prompt] = (cond, pooled)
        return self._prompt_cache[prompt]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[B, tokens, dim] text conditioning from the host's CLIP (no grad), cached per prompt.

        Prompts of more than one 75-token chunk are repeated to a common length as ComfyUI does
        when it batches conditioning (`CONDCrossAttn`), which leaves attention outputs unchanged.
        For models with a pooled-text input (SDXL) one more row is appended after the tokens that
        carries the pooled vector (zero-padded to the width); `predict_noise` takes it off again.
        """
        encoded = [self._encode_one(p) for p in prompts]
        lengths = [c.shape[0] for c, _ in encoded]
        common = math.lcm(*lengths)
        conds = [c.repeat(common // c.shape[0], 1) if c.shape[0] != common else c for c, _ in encoded]
        context = torch.stack(conds)
        if self._adm_channels:
            rows = []
            for _, pooled in encoded:
                row = torch.zeros(context.shape[-1], device=context.device)
                if pooled is None:
                    raise DugeError("this model needs CLIP's pooled output (SDXL) but the CLIP gave none")
                row[: pooled.shape[-1]] = pooled
                rows.append(row)
            context = torch.cat([context, torch.stack(rows)[:, None]], dim=1)
        return context

    def _split_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._adm_channels:
            return context, None
        return context[:, :-1], context[:, -1]

    def token_indices(self, prompts, words, eos_fallback=False):
        """Positions of `words[i]` in `prompts[i]` as CLIP tokenizes them: (indices [B, K], mask [B, K])."""
        indices, mask = token_indices_for(_ClipTokenizerView(self.clip), prompts, words, eos_fallback=eos_fallback)
        return indices.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------- diffusion
    def _sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model_sampling.sigma(timesteps.float().to(self.model_sampling.sigmas.device)).to(self.device)

    def add_noise(self, latents, noise, timesteps):
        """√ᾱ_t·x0 + √(1−ᾱ_t)·ε through the model's own model_sampling (see the module docstring)."""
        sigma = self._sigmas(timesteps)
        noisy = self.model_sampling.noise_scaling(sigma, noise.to(latents), latents)
        return self.model_sampling.calculate_input(sigma, noisy)

    def predict_noise(self, noisy, timesteps, context, transformer_options: dict | None = None):
        """The UNet's raw output (ε or v per `prediction_type`) [B, C, h, w], float32."""
        self._check_interrupt()
        self._load()
        context, pooled = self._split_context(context)
        sigma = self._sigmas(timesteps)
        t = self.model_sampling.timestep(sigma).float()
        options = dict(self._capture_options or self.patcher.model_options.get("transformer_options", {}))
        if transformer_options:
            options.update(transformer_options)
        options["sigmas"] = sigma
        if torch.is_grad_enabled() and "optimized_attention_override" not in options:
            options["optimized_attention_override"] = differentiable_attention
        extra = {}
        if pooled is not None:
            height, width = (s * 8 for s in noisy.shape[-2:])
            adm = self.patcher.model.encode_adm(pooled_output=pooled[:, :self._pooled_width()], width=width,
                                                height=height, device=self.device)
            extra["y"] = adm.to(self.device, self.compute_dtype)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            out = self.patcher.model.diffusion_model(
                noisy.to(self.compute_dtype), t, context=context.to(self.compute_dtype),
                transformer_options=options, **extra,
            )
        return out.float()

    def _pooled_width(self) -> int:
        # SDXL's adm = pooled (1280) + 6 size embeddings of 256.
        return self._adm_channels - 6 * 256

    def _conditioning(self, prompts: list[str]) -> list:
        context = self.encode_prompts(prompts)
        cond, pooled = self._split_context(context)
        extra = {}
        if pooled is not None:
            extra["pooled_output"] = pooled[:, : self._pooled_width()]
        else:
            pooled_list = [self._encode_one(p)[1] for p in prompts]
            if all(p is not None for p in pooled_list):
                extra["pooled_output"] = torch.stack(pooled_list)
        return [[cond.cpu(), {k: v.cpu() for k, v in extra.items()}]]

    @torch.no_grad()
    def sample_latents(self, prompts, seed, steps, guidance, on_step=None, negative_prompt: str = ""):
        """Clean latents [B, C, h, w] as the UNet sees them (`process_latent_in` applied), from the
        KSampler machinery; image i uses the noise KSampler draws for seed `seed + i` (or `seed[i]` given a
        list of seeds); `on_step()` after each sampler step."""
        seeds = image_seeds(seed, len(prompts))
        # inference_mode(False) switches grad mode back on: no_grad after it (no graph while sampling)
        with torch.inference_mode(False), torch.no_grad():
            height, width = self.latent_size
            empty = torch.zeros(1, self.latent_channels, height, width)
            noise = torch.cat([comfy.sample.prepare_noise(empty, s) for s in seeds])
            latent_image = torch.zeros_like(noise)
            positive = self._conditioning(list(prompts))
            negative = self._conditioning([negative_prompt] * len(prompts))

            def callback(step, x0, x, total_steps):
                self._check_interrupt()
                if on_step is not None:
                    on_step()

            samples = comfy.sample.sample(self.patcher, noise, steps, guidance, self.sampler_name, self.scheduler,
                                          positive, negative, latent_image, callback=callback, disable_pbar=True,
                                          seed=seeds[0] if seeds else 0)
            latents = self.patcher.model.process_latent_in(samples.to(self.device, torch.float32))
        return latents.clone()

    @torch.no_grad()
    def decode(self, latents):
        """Images [B, 3, H, W] in [0, 1] from latents as the UNet sees them."""
        if self.vae is None:
            raise DugeError("decoding images needs a VAE; connect the VAE that belongs to the model")
        with torch.inference_mode(False), torch.no_grad():  # a checkpoint's VAE holds inference tensors
            raw = self.patcher.model.process_latent_out(latents.float()).cpu()
            images = self.vae.decode(raw)  # [B, H, W, 3]
        return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1).float().clamp(0, 1).cpu()

    @torch.no_grad()
    def generate(self, prompts, seed, steps, guidance, on_step=None):
        """Images [B, 3, H, W] in [0, 1] (seeds as in `sample_latents`)."""
        return self.decode(self.sample_latents(prompts, seed, steps, guidance, on_step=on_step))

    # ---------------------------------------------------------------- structure
    def set_gradient_checkpointing(self, enabled: bool) -> bool:
        """ComfyUI's UNet forward has no per-block recomputation hook: only False is accepted (memory is
        kept down by micro-batching instead, `UnlearnConfig.micro_batch_size`)."""
        if enabled:
            raise DugeError("gradient_checkpointing: not available on a ComfyUI MODEL (its UNet has no per-block "
                            "recomputation hook); leave it 'auto' or false and lower the memory with "
                            "micro_batch_size or memory_budget_gb")
        return False

    def gradient_checkpointing_ratio(self) -> float | None:
        return None

    def cross_attention_layers(self) -> list[str]:
        """diffusers names of the UNet's attn2 modules, in forward order (input, middle, output)."""
        layers = {}
        for diffusers_name, comfy_name in self.layer_names.items():
            match = re.fullmatch(r"(.*\.attn2)\.to_q", diffusers_name)
            if match:
                key = attn2_block_key(comfy_name[: -len(".to_q")])
                if key is not None:
                    layers[match.group(1)] = key
        order = {"input": 0, "middle": 1, "output": 2}
        return sorted(layers, key=lambda name: (order[layers[name][0]], layers[name][1], layers[name][2]))

    def trainable_linears(self, pattern: str) -> dict[str, torch.nn.Module]:
        """The UNet's linear layers (ComfyUI modules, by diffusers name) matching the trainable pattern."""
        regex = re.compile(pattern)
        found = {}
        for diffusers_name, comfy_name in self.layer_names.items():
            if regex.search(diffusers_name):
                module = comfy.utils.get_attr(self.patcher.model, comfy_name)
                if isinstance(module, torch.nn.Linear):
                    found[diffusers_name] = module
        if not found:
            raise DugeError(f"no linear layer of the UNet matches the trainable pattern {pattern!r}")
        return found

    @contextmanager
    def capture_attention(self, layers, token_indices):
        """Capture cross-attention probabilities of the given token columns through the attn2 replace hook."""
        available = self.cross_attention_layers()
        chosen = available if layers is None else list(layers)
        unknown = [name for name in chosen if name not in available]
        if unknown:
            raise ValueError(f"capture_attention: {unknown} are not cross-attention layers; expected names among {available}")
        store = CrossAttentionStore([name for name in available if name in chosen], token_indices)
        replace = {}
        for name in store.layers:
            comfy_name = self.layer_names[name + ".to_q"][: -len(".to_q")]
            replace[attn2_block_key(comfy_name)] = _Attn2Capture(store, name)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        patches_replace = dict(options.get("patches_replace", {}))
        patches_replace["attn2"] = {**patches_replace.get("attn2", {}), **replace}
        options["patches_replace"] = patches_replace
        previous = self._capture_options
        self._capture_options = options
        try:
            yield store
        finally:
            self._capture_options = previous

    # ---------------------------------------------------------------- edits
    @contextmanager
    def edits(self, pattern: str, mode: str = "full", rank: int = 4):
        """Install a `DeltaWeight` weight wrapper on every matching layer of a training clone.

        Yields `LayerEdits` keyed by diffusers names. Weights that are inference tensors (a model
        loaded by a node, under the executor's inference mode) cannot take part in autograd: for the
        run, the training clone holds equal normal-tensor copies of them, and the original tensor
        objects are put back on exit. On exit — normally, on an error or on Cancel — the training
        clone is unloaded and the wrappers taken off the shared modules, so the incoming MODEL is
        exactly as it was (same tensors, same values).
        """
        base = self.patcher
        training = base.clone()
        linears = self.trainable_linears(pattern)
        deltas: dict[str, DeltaWeight] = {}
        frozen: list[torch.nn.Parameter] = []  # parameters whose requires_grad we switched off
        swapped: dict[str, torch.nn.Parameter] = {}  # key -> the module's own (inference) parameter
        try:
            training.set_model_compute_dtype(self.compute_dtype)
            for name, module in linears.items():
                delta = DeltaWeight(module.weight, mode=mode, rank=rank).to(self.device)
                training.add_weight_wrapper(self.layer_names[name] + ".weight", delta)
                deltas[name] = delta
            for param in training.model.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(param)
            self.patcher = training
            mm.load_models_gpu([training], memory_required=1e20 if self.device.type != "cpu" else 0,
                               force_full_load=True)
            with torch.no_grad():
                for name, param in list(training.model.diffusion_model.named_parameters()):
                    if param.is_inference():
                        key = UNET_PREFIX + name
                        swapped[key] = param
                        comfy.utils.set_attr_param(training.model, key, param.detach().clone())
            originals = {name: comfy.utils.get_attr(training.model, self.layer_names[name] + ".weight")
                         for name in linears}
            self._edit_deltas = deltas
            yield LayerEdits(deltas, originals)
        finally:
            self._edit_deltas = {}
            self.patcher = base
            for key, param in swapped.items():
                comfy.utils.set_attr(training.model, key, param)
            _unload(training)
            ours = {id(d) for d in deltas.values()}
            for module in linears.values():
                if "weight_function" in vars(module):
                    module.weight_function = [f for f in module.weight_function if id(f) not in ours]
            for param in frozen:
                with torch.inference_mode(param.is_inference()):
                    param.requires_grad_(True)

    def fingerprint(self) -> str:
        """The diffusion model's weights as loaded (ComfyUI's patches, e.g. LoRAs, applied) and the committed
        deltas of the installed edits (weight wrappers, not in the state dict), sampled (`module_fingerprint`),
        and the latent size it generates."""
        self._load()
        committed = {name: d.committed for name, d in self._edit_deltas.items()}
        return f"{module_fingerprint(self.patcher.model.diffusion_model, committed)}@{self.latent_size}"

    def edited_model(self, deltas: dict[str, torch.Tensor], strength: float = 1.0):
        """A clone of the incoming MODEL with `deltas` (diffusers names -> ΔW) as weight patches."""
        out = self.incoming.clone()
        patches = {}
        for name, delta in deltas.items():
            if name not in self.layer_names:
                raise DugeError(f"the edit changes '{name}', which this UNet does not have")
            patches[self.layer_names[name] + ".weight"] = ("diff", (delta.detach().float().cpu(),))
        applied = out.add_patches(patches, strength)
        missing = sorted(set(patches) - set(applied))
        if missing:
            raise DugeError(f"{len(missing)} edited weights are not in the model, e.g. {missing[:3]}")
        return out

    def comfy_key(self, name: str) -> str:
        """The ComfyUI state-dict key of a layer's weight (`diffusion_model.….weight`) from its diffusers name."""
        return self.layer_names[name] + ".weight"


def default_latent_size(model) -> tuple[int, int]:
    """The latent size a model was trained at: the model config's `duge_latent_size` if it has one
    (the built-in demo model), 128 for SDXL-like UNets (1024 px), 96 for v-prediction SD 2.x
    (768 px), else 64 (512 px)."""
    config = model.model.model_config
    size = getattr(config, "duge_latent_size", None)
    if size:
        return (int(size), int(size))
    unet_config = config.unet_config
    if unet_config.get("adm_in_channels") and unet_config.get("context_dim") == 2048:
        return (128, 128)
    if unet_config.get("context_dim") == 1024 and model.model.model_type == model.model.model_type.V_PREDICTION:
        return (96, 96)
    return (64, 64)

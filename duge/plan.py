"""`duge plan`: peak memory and time per request of an unlearning run, before anything is trained.

Everything is computed from the model's real parameter counts (its modules, built on the meta
device when only a config is at hand) and from its UNet config; nothing runs on the device except
an optional one-second matmul to measure its throughput.

Memory (bytes), for one training step — the peak of a request:

    M = W + E + A

- W, the frozen weights: (UNet + text encoders + VAE parameters) · s, where s = 2 for fp16/bf16
  storage (CUDA with autocast: `storage_dtype`) and 4 for float32.
- E, the edited layers: per edited weight element its float32 committed delta (4 bytes); the
  effective weight W0 + Δ is built per layer when the layer runs and not kept (autograd saves the
  text context, not the weight, since the context needs no gradient), and the regulariser is
  back-propagated one layer at a time. For the trainable parameters (every edited element in
  `full` mode, r · (out + in) per layer in `lora` mode): value, gradient and AdamW's two moments,
  16 bytes each.
- A, the activations kept for the backward pass, for the rows of one UNet pass in the compute
  dtype's bytes a. A step's anchor rows (B, plus the replayed rows after a sequential run's first
  request) and its related rows (B when the request preserves related concepts) are two groups,
  each back-propagated before the next runs, so A is set by the larger group — or by the
  micro-batch, when the rows go through the UNet a few at a time (gradients accumulated; the same
  step). "auto" gradient checkpointing and micro-batch size are settled against the device's
  memory as a run settles them (`choose_memory_settings`): the whole group if it fits, else the
  largest micro-batch that fits, and checkpointing only when one row does not fit. A pass peaks at
  `BACKWARD_PEAK` (1.15, measured) times what it keeps, for the backward's temporaries. Per row,
  summed over the UNet at its latent resolutions (P = h · w pixels of a level, c
  channels, T = text tokens):

      ResNet block (c_in → c_out):           (3 c_in + 5 c_out) · P
      Transformer2D (c, depth D):            4 c · P + D · (28 c · P + 2 c · T)
      down/upsampler, conv_out:              c · P (at the conv's input), 3 c0 · P
  (28 c per token per transformer block: two LayerNorm inputs and outputs ×3, q, k, v and both
  attention outputs, the cross-attention query, GEGLU's 8c projection, its 4c GELU and 4c product.)
  Attention matrices are not counted: xformers and PyTorch's SDPA (flash / memory-efficient, also
  on the CPU) keep O(P) per head, not O(P²).
  With gradient checkpointing every ResNet block and every transformer block keeps only its input
  (c_in · P or c · P) and one block at a time is recomputed in the backward pass, so A is the
  sum of those inputs plus the non-checkpointed parts, plus the largest single block's full
  activations for the rows of the pass.

Time (FLOPs): F = one UNet forward for one sample, counted by torch's FlopCounterMode on the meta
device (exact per operation, no computation). One step costs 2 B F (reference passes, no grad;
+ 2 B F more with `anchor_guidance`, the unedited model on target and anchor prompts) +
2 B F (the two passes with grad) + 2 B F (their backward: input gradients through the frozen
weights ≈ one forward; weight gradients only for the edited layers) [+ 2 B F recomputation with
gradient checkpointing]; a request adds its cached images: (anchor + related images) · sampler_steps
· 2 F (classifier-free guidance). Seconds = FLOPs / (throughput · 0.5), the throughput being a
measured matmul rate of the device (or `--tflops`) and 0.5 the share of it a UNet reaches.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .edits import trainable_pattern
from .layouts import LAYOUTS, folder_layout, pipeline_layout, reference_config_dir
from .memory import BACKWARD_PEAK, MEMORY_MARGIN, choose_memory_settings
from .models import resolve_model_path, single_file_layout_of
from .world.model import BUILTIN_MODEL_DIR

UNET_EFFICIENCY = 0.5  # share of the matmul throughput a UNet forward/backward reaches (assumed)
ADAM_BYTES = 16  # value, gradient, exp_avg, exp_avg_sq in float32
EDITED_BYTES = 4  # the float32 committed delta of each edited weight element
GiB = 2**30


@dataclass
class ActivationCount:
    """Activation elements per sample kept for the backward pass."""

    full: float  # without gradient checkpointing
    checkpointed: float  # block inputs kept with checkpointing (+ non-checkpointed parts)
    largest_block: float  # the largest single checkpointed block's full activations (recomputed one at a time)


def _per_block(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def unet_activation_elements(unet_config: dict, latent_hw: tuple[int, int], text_tokens: int) -> ActivationCount:
    """Per-sample activation elements of a `UNet2DConditionModel` config at latent size `latent_hw` (module doc)."""
    channels = list(unet_config["block_out_channels"])
    n = len(channels)
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = _per_block(unet_config.get("layers_per_block", 2), n)
    depth = _per_block(unet_config.get("transformer_layers_per_block", 1) or 1, n)
    h, w = latent_hw
    full = checkpointed = largest = 0.0

    def resnet(c_in, c_out, pixels):
        nonlocal full, checkpointed, largest
        block = (3 * c_in + 5 * c_out) * pixels
        full += block
        checkpointed += c_in * pixels
        largest = max(largest, block)

    def transformer(c, d, pixels):
        nonlocal full, checkpointed, largest
        outer = 4 * c * pixels
        block = 28 * c * pixels + 2 * c * text_tokens
        full += outer + d * block
        checkpointed += outer + d * c * pixels
        largest = max(largest, block)

    def conv(c, pixels):
        nonlocal full, checkpointed
        full += c * pixels
        checkpointed += c * pixels

    pixels = [(h // 2**i) * (w // 2**i) for i in range(n)]
    skips = [channels[0]]  # conv_in output
    previous = channels[0]
    for i, kind in enumerate(down_types):
        for j in range(layers[i]):
            resnet(previous, channels[i], pixels[i])
            previous = channels[i]
            if kind.startswith("CrossAttn"):
                transformer(channels[i], depth[i], pixels[i])
            skips.append(channels[i])
        if i < n - 1:
            conv(channels[i], pixels[i])
            skips.append(channels[i])
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        resnet(channels[-1], channels[-1], pixels[-1])
        transformer(channels[-1], depth[-1], pixels[-1])
        resnet(channels[-1], channels[-1], pixels[-1])
    reversed_channels = channels[::-1]
    reversed_layers = layers[::-1]
    reversed_depth = _per_block(unet_config.get("reverse_transformer_layers_per_block") or depth[::-1], n)
    previous = channels[-1]
    for i, kind in enumerate(up_types):
        level = n - 1 - i
        for j in range(reversed_layers[i] + 1):
            resnet(previous + skips.pop(), reversed_channels[i], pixels[level])
            previous = reversed_channels[i]
            if kind.startswith("CrossAttn"):
                transformer(reversed_channels[i], reversed_depth[i], pixels[level])
        if i < n - 1:
            conv(reversed_channels[i], pixels[level - 1])
    conv(3 * channels[0], pixels[0])  # conv_norm_out, SiLU, conv_out
    return ActivationCount(full, checkpointed, largest)


@dataclass
class ModelSizes:
    """Parameter counts of a pipeline's parts and the edited layers' shapes."""

    unet: int
    text_encoders: int
    vae: int
    edited_elements: int  # Σ out · in over the edited layers
    edited_layers: list[tuple[int, int]]  # (out, in) per edited layer
    unet_config: dict
    text_tokens: int
    vae_scale_factor: int


def model_sizes(pipe, trainable: str = "kv") -> ModelSizes:
    """Parameter counts from the pipeline's modules (real or on the meta device)."""
    regex = re.compile(trainable_pattern(trainable))
    shapes = [tuple(m.weight.shape) for name, m in pipe.unet.named_modules()
              if isinstance(m, torch.nn.Linear) and regex.search(name)]
    encoders = [getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return ModelSizes(
        unet=count(pipe.unet), text_encoders=sum(count(e) for e in encoders), vae=count(pipe.vae),
        edited_elements=sum(o * i for o, i in shapes), edited_layers=shapes, unet_config=dict(pipe.unet.config),
        text_tokens=int(pipe.tokenizer.model_max_length),
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
    )


def unet_forward_flops(pipe, latent_hw: tuple[int, int]) -> float:
    """FLOPs of one UNet forward for one sample at `latent_hw`, counted on the meta device."""
    from accelerate import init_empty_weights  # deferred: accelerate takes seconds to import, only `duge plan` asks

    unet = pipe.unet
    if next(unet.parameters()).device.type != "meta":
        with init_empty_weights():
            unet = type(unet).from_config(unet.config)
    config = unet.config
    sample = torch.zeros(1, config.in_channels, *latent_hw, device="meta")
    context = torch.zeros(1, pipe.tokenizer.model_max_length, config.cross_attention_dim, device="meta")
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled_dim, device="meta"),
                                      "time_ids": torch.zeros(1, 6, device="meta")}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.zeros(1, device="meta"), encoder_hidden_states=context, **extra)
    return float(counter.get_total_flops())


def measure_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Matmul throughput of `device` in TFLOPS (a 1024² or 4096² matmul repeated for about `seconds`)."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


@dataclass
class Plan:
    """What `duge plan` prints: memory in GiB, time in seconds, and the inputs they came from."""

    model: str
    layout: str
    resolution: int
    latent: tuple[int, int]
    batch_size: int
    replay_rows: int  # replayed rows of earlier requests per step (sequential setting, after the first request)
    related_batch: int
    device: str
    storage_bytes: int
    compute_bytes: int
    gradient_checkpointing: bool
    micro_batch_size: int  # 0: the whole batch in one pass
    memory_choice: str  # why (duge.memory.choose_memory_settings)
    vram_gib: float | None
    trainable: str
    trainable_mode: str
    parameters: dict = field(default_factory=dict)  # unet, text_encoders, vae, edited, trainable
    memory_gib: dict = field(default_factory=dict)  # weights, edits, activations, total
    activation_gib_other_setting: float = 0.0  # A with gradient checkpointing switched the other way
    unet_forward_gflops: float = 0.0
    tflops: float = 0.0
    tflops_source: str = ""
    seconds_per_step: float = 0.0
    seconds_per_request: float = 0.0
    steps: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        m, p = self.memory_gib, self.parameters
        lines = [
            f"model {self.model} ({self.layout}), {self.resolution} px (latent {self.latent[0]}x{self.latent[1]}), "
            f"device {self.device}",
            f"parameters: UNet {p['unet'] / 1e6:.1f} M, text encoders {p['text_encoders'] / 1e6:.1f} M, "
            f"VAE {p['vae'] / 1e6:.1f} M; edited ({self.trainable}) {p['edited'] / 1e6:.2f} M, "
            f"trainable ({self.trainable_mode}) {p['trainable'] / 1e6:.2f} M",
            f"batch {self.batch_size} anchor + {self.replay_rows} replayed + {self.related_batch} related, weights in {8 * self.storage_bytes}-bit, "
            f"activations in {8 * self.compute_bytes}-bit, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, "
            + (f"micro-batches of {self.micro_batch_size} rows" if self.micro_batch_size else "whole batch per pass")
            + (f" (for {self.vram_gib:g} GiB: {self.memory_choice})" if self.vram_gib else ""),
            f"peak memory  {m['total']:.2f} GiB = weights {m['weights']:.2f} + edits {m['edits']:.2f} "
            f"+ activations {m['activations']:.2f}",
            f"             (activations with gradient checkpointing {'off' if self.gradient_checkpointing else 'on'}: "
            f"{self.activation_gib_other_setting:.2f} GiB)",
            f"time         {self.seconds_per_step:.2f} s/step, {self.seconds_per_request:.0f} s per request of "
            f"{self.steps} steps (UNet forward {self.unet_forward_gflops:.0f} GFLOP/sample at "
            f"{self.tflops:.2f} TFLOPS {self.tflops_source} x {UNET_EFFICIENCY})",
        ]
        return "\n".join(lines)


def plan_run(pipe, config, model_name: str = "", resolution: int | None = None, device: str | None = None,
             tflops: float | None = None, related_concepts: int = 1, vram_gib: float | None = None) -> Plan:
    """The plan for `config` (an `UnlearnConfig`) on `pipe` (real or meta weights); see the module doc.

    `device`: "cuda" or "cpu" (default: CUDA when available); `related_concepts`: preserved concepts
    per request (sets the related batch: B when > 0, else 0). `vram_gib`: the device's memory, for
    settling "auto" gradient checkpointing and micro-batch size as a run would
    (`choose_memory_settings`); None: no limit (the whole batch in one pass, no checkpointing).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    half = device.type == "cuda" and config.dtype != "float32"
    storage = compute = 2 if half else 4
    sizes = model_sizes(pipe, config.trainable)
    resolution = resolution or sizes.unet_config["sample_size"] * sizes.vae_scale_factor
    latent = (resolution // sizes.vae_scale_factor, resolution // sizes.vae_scale_factor)
    batch = config.batch_size
    # A step's anchor rows (the current request's batch plus, after the first request of a
    # sequential run, the replayed rows) and its related rows run through the UNet one group after
    # the other, each back-propagated before the next: the activations peak at the larger group.
    rows = batch + (config.replay_batch_size if config.setting == "sequential" else 0)
    related = config.related_rows if related_concepts > 0 and config.lambda_prior > 0 else 0
    samples = rows + related

    if config.trainable_mode == "lora":
        trainable = sum(min(config.trainable_rank, o, i) * (o + i) for o, i in sizes.edited_layers)
    else:
        trainable = sizes.edited_elements
    weights = (sizes.unet + sizes.text_encoders + sizes.vae) * storage
    edits = sizes.edited_elements * EDITED_BYTES + trainable * ADAM_BYTES
    counts = unet_activation_elements(sizes.unet_config, latent, sizes.text_tokens)
    per_row_full = counts.full * compute
    per_row_checkpointed = (counts.checkpointed + counts.largest_block) * compute
    budget = None
    if vram_gib is not None:
        budget = max(0.0, (vram_gib * GiB - weights - edits) * MEMORY_MARGIN)
    choice = choose_memory_settings(max(rows, related), per_row_full, per_row_checkpointed, budget,
                                    config.gradient_checkpointing, config.micro_batch_size)
    in_pass = max(rows, related) if not choice.micro_batch_size else min(choice.micro_batch_size, max(rows, related))
    full, checkpointed = (per_row_full * in_pass * BACKWARD_PEAK, per_row_checkpointed * in_pass * BACKWARD_PEAK)
    activations, other = (checkpointed, full) if choice.gradient_checkpointing else (full, checkpointed)

    flops = unet_forward_flops(pipe, latent)
    if tflops is None:
        tflops = measure_tflops(device, torch.float16 if half else torch.float32)
        source = "measured"
    else:
        source = "given"
    rate = tflops * 1e12 * UNET_EFFICIENCY
    guidance = 2 * rows if config.method == "duge" and config.anchor_guidance > 0 else 0  # θ0 on target and anchor
    per_step = (2 * rows + guidance + 2 * samples + 2 * samples
                + (2 * samples if choice.gradient_checkpointing else 0)) * flops
    cached = (config.anchor_images + config.related_images * related_concepts) * config.sampler_steps * 2 * flops
    return Plan(
        model=model_name, layout=pipeline_layout(pipe).name, resolution=resolution, latent=latent, batch_size=batch,
        replay_rows=rows - batch, related_batch=related, device=device.type, storage_bytes=storage, compute_bytes=compute,
        gradient_checkpointing=choice.gradient_checkpointing, micro_batch_size=choice.micro_batch_size,
        memory_choice=choice.reason, vram_gib=vram_gib, trainable=config.trainable,
        trainable_mode=config.trainable_mode,
        parameters={"unet": sizes.unet, "text_encoders": sizes.text_encoders, "vae": sizes.vae,
                    "edited": sizes.edited_elements, "trainable": trainable},
        memory_gib={"weights": weights / GiB, "edits": edits / GiB, "activations": activations / GiB,
                    "total": (weights + edits + activations) / GiB},
        activation_gib_other_setting=other / GiB, unet_forward_gflops=flops / 1e9, tflops=tflops,
        tflops_source=source, seconds_per_step=per_step / rate,
        seconds_per_request=(per_step * config.steps + cached) / rate, steps=config.steps,
    )


def meta_pipeline(model: str | Path, config_dir: str | Path | None = None):
    """A pipeline with every weight on the meta device, from a diffusers folder, a reference layout name
    ('sd15', 'sd21', 'sdxl') or a single file's header: parameter counts without loading any weight."""
    names = {layout.reference_config: name for name, layout in LAYOUTS.items()}
    tokenizer = BUILTIN_MODEL_DIR / "tokenizer"
    if str(model) in names:
        return _meta_pipeline_from_folder(reference_config_dir(names[str(model)]), tokenizer)
    path = resolve_model_path(model)
    if path.is_file():
        layout = single_file_layout_of(path)
        folder = Path(config_dir) if config_dir else reference_config_dir(layout)
    else:
        folder = path
    return _meta_pipeline_from_folder(folder, tokenizer)


def _meta_pipeline_from_folder(folder: Path, fallback_tokenizer: Path):
    import diffusers  # deferred with accelerate and transformers: seconds to import, only `duge plan` needs them
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    layout = folder_layout(folder)
    with init_empty_weights():
        components = {
            "unet": diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(folder / "unet")),
            "vae": diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae")),
        }
        for name in layout.text_encoders:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            components[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
    for name in layout.tokenizers:
        source = folder / name if (folder / name).exists() else fallback_tokenizer
        components[name] = CLIPTokenizer.from_pretrained(str(source))
        components[name].model_max_length = json.loads((folder / layout.text_encoders[0] / "config.json").read_text()).get(
            "max_position_embeddings", components[name].model_max_length)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    components["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    cls = getattr(diffusers, layout.pipeline_class)
    extra = {"add_watermarker": False} if layout.name == "sdxl" else {
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return cls(**components, **extra)

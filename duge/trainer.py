"""The continual unlearning loop: `UnlearnConfig` and `unlearn`.

For each request the frozen reference model generates the images the losses need (anchor images,
devoid of the target, and images of the related concepts to preserve), cached per request; then
the trainable deltas on the cross-attention K/V are optimised with

    L = L_xattn + λ_prior · L_prior + λ_reg · L_reg          (design doc §2)

Settings: sequential (each request starts from the last result; the default), independent (each
from θ0; the results are merged at the end), simultaneous (all requests in one optimisation).
The host model is never changed: edits are deltas removed in `finally`, so an error, Ctrl-C or a
cancel callback leaves the host bit-identical and returns nothing. A NaN/inf loss or weight, or an
optimiser step that overflows, rolls the request back to the deltas committed before it and raises
`TrainingDiverged`. `on_request_done` sees each finished request (`duge.progress` checkpoints it)
and `resume` continues from such checkpoints with the same result as a run never stopped.

The frozen reference ε_φ of request k is the model as request k−1 left it (θ0 plus the deltas
already committed; θ0 itself for the first request and in the independent setting). Taking θ0
instead would make later requests teach erased concepts back: a colour request's templates and
related concepts ("a orange circle") would be denoised by a reference that still draws circles.
The regulariser still anchors to θ0, which is what keeps erosion from accumulating.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from .attention import reduce_token_maps
from .concepts import ConceptSet, ResolvedRequest, render_prompt, resolve_request
from .distributed import average_gradients, check_batch, masked_shard_weight, shard_rows, shard_weight
from .edits import trainable_pattern
from .errors import DugeError
from .image_cache import load_or_build_request_cache
from .losses import cross_attention_loss, prior_preservation_loss, regularization_loss
from .methods import get_method

logger = logging.getLogger(__name__)

SETTINGS = ("sequential", "independent", "simultaneous")


class UnlearnCancelled(DugeError):
    """The run was cancelled (Ctrl-C or a cancel callback); nothing was produced."""


class TrainingDiverged(DugeError):
    """A loss or weight became NaN/inf; the request was rolled back."""


@dataclass
class UnlearnConfig:
    """Every setting of a run. The command line and the nodes fill it; defaults are DUGE's."""

    method: str = "duge"  # "duge" or a baseline: "ca", "ft-l2sp", "esd-x", "uce" (duge.methods)
    setting: str = "sequential"
    steps: int = 150  # optimisation steps per request (a request's `steps` overrides)
    learning_rate: float = 2e-3
    batch_size: int = 8
    beta: float = 10.0  # weight of the attention-map term inside L_xattn
    lambda_prior: float = 1.0
    lambda_reg: float = 2e-5  # L_reg is a sum over parameters (see losses.regularization_loss)
    regularizer: str = "l2sp"  # "l2sp" (F = 1) or "fisher" (diagonal Fisher on general prompts)
    trainable: str = "kv"  # "kv" | "qkv" | "attn2"
    trainable_mode: str = "full"  # "full" deltas or "lora"
    lora_rank: int = 4
    attention_layers: list[str] | None = None  # None: every cross-attention layer
    anchor_images: int = 16  # images from the anchor prompts, per request
    related_images: int = 4  # images per related concept
    cache_steps: int = 20  # sampler steps for the cached images
    cache_guidance: float = 7.5
    dtype: str = "auto"  # "auto" | "float32" | "float16" | "bfloat16" (autocast; deltas stay float32)
    seed: int = 0
    fisher_samples: int = 8
    # DUGE's output-term target guided away from the target prompt by this much (0: the anchor's
    # prediction alone, as in the design doc): ε_φ(anchor) − η_a·(ε_θ0(target) − ε_θ0(anchor)).
    anchor_guidance: float = 0.5
    esd_eta: float = 1.0  # negative-guidance strength of the esd-x baseline
    # The uce baseline's closed form (duge.uce): λ, erase and preserve scales of the authors' script.
    uce_lambda: float = 0.5
    uce_erase_scale: float = 1.0
    uce_preserve_scale: float = 1.0
    # Sequential setting: samples replaying the cross-attention loss of earlier requests (their
    # cached anchor images), added to each step's batch, so that a later request — and the
    # regulariser's pull towards θ0 — cannot undo an earlier erasure. 0 turns replay off.
    replay_batch_size: int = 4
    # Memory (duge.plan.choose_memory_settings). gradient_checkpointing: recompute each UNet block in
    # the backward pass instead of keeping its activations; micro_batch_size: rows of the batch per
    # UNet pass, their gradients accumulated (the same step as the whole batch at once; 0: all at
    # once). "auto" for either: chosen at the start of the run so that the activations fit the
    # device's free memory (or `memory_budget_gib`), micro-batching first (it costs no compute),
    # checkpointing only when one row alone would not fit. The choice is logged.
    gradient_checkpointing: bool | str = "auto"
    micro_batch_size: int | str = "auto"
    memory_budget_gib: float | None = None  # None: the device's free memory when the run starts
    # A folder where the cached anchor/related images of each request are kept between runs
    # (duge.image_cache), None: kept in memory only.
    cache_dir: str | None = None

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise DugeError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        for name in ("steps", "batch_size", "anchor_images"):
            if getattr(self, name) < 1:
                raise DugeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.replay_batch_size < 0:
            raise DugeError(f"replay_batch_size must be 0 (no replay) or more, got {self.replay_batch_size}")
        if self.anchor_guidance < 0:
            raise DugeError(f"anchor_guidance must be 0 or more, got {self.anchor_guidance}")
        if self.learning_rate <= 0:
            raise DugeError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise DugeError(f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        if self.micro_batch_size != "auto" and (isinstance(self.micro_batch_size, bool)
                                                or not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 0):
            raise DugeError(f"micro_batch_size must be 'auto', 0 (the whole batch) or a positive number of rows, "
                            f"got {self.micro_batch_size!r}")
        if self.memory_budget_gib is not None and not self.memory_budget_gib > 0:
            raise DugeError(f"memory_budget_gib must be positive or None, got {self.memory_budget_gib!r}")
        if self.regularizer not in ("l2sp", "fisher"):
            raise DugeError(f"regularizer must be 'l2sp' or 'fisher', got {self.regularizer!r}")
        trainable_pattern(self.trainable)
        get_method(self.method)


@dataclass
class RequestCache:
    """What θ0 generated for one request. Latents [N, C, h, w] as the UNet sees them."""

    request: ResolvedRequest
    anchor_latents: torch.Tensor
    anchor_templates: list[int]  # template index of each anchor latent
    related_latents: torch.Tensor
    related_prompts: list[str]
    dropped_anchor_images: int = 0
    target_latents: torch.Tensor | None = None  # images of the target itself (esd-x only), one per anchor template


@dataclass
class RequestResult:
    target: str
    delta: dict[str, torch.Tensor]  # this request's ΔW per layer [out, in], float32
    seconds: float
    steps: int
    final_losses: dict[str, float]
    metrics: dict = field(default_factory=dict)


@dataclass
class UnlearnResult:
    config: UnlearnConfig
    requests: list[RequestResult]
    total_delta: dict[str, torch.Tensor]  # θ - θ0 per layer

    def manifest_requests(self, resolved: list[ResolvedRequest]) -> list[dict]:
        """Per request: target, anchor, preserve, settings and measured metrics (for a manifest)."""
        by_target = {r.target: r for r in resolved}
        out = []
        for r in self.requests:
            spec = by_target.get(r.target)
            out.append({
                "target": r.target,
                "anchor": spec.anchor if spec else None,
                "preserve": list(spec.preserve) if spec else [],
                "settings": {"method": self.config.method, "setting": self.config.setting, "steps": r.steps,
                             "learning_rate": self.config.learning_rate, "trainable": self.config.trainable},
                "metrics": {"seconds": round(r.seconds, 3),
                            **{k: r.metrics.get(k) for k in ("UA", "IRA", "CRA") if k in r.metrics}},
            })
        return out


ProgressFn = Callable[[dict], None]
RequestDoneFn = Callable[[int, RequestResult, RequestCache], None]


@dataclass
class ResumeState:
    """What a stopped sequential (or independent) run had finished: requests 0..k-1, in order.

    `results[i].delta` is request i's ΔW; `caches[i]` its anchor/related images, which later
    requests replay. `duge.progress` writes and reads these.
    """

    results: list[RequestResult]
    caches: list[RequestCache]


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise UnlearnCancelled("unlearning cancelled; the model was left unchanged and nothing was written")


def build_request_cache(backend, request: ResolvedRequest, config: UnlearnConfig, seed: int,
                        image_filter=None) -> RequestCache:
    """Generate the anchor and related images with the frozen model θ0 (edits disabled by the caller).

    `image_filter(latents, request) -> keep mask [N] bool` may drop anchor images that still show
    the target (the built-in evaluator does this); at least a quarter are always kept.
    """
    if get_method(config.method).objective == "closed_form":  # UCE needs no images
        return RequestCache(request, torch.zeros(0), [], torch.zeros(0), [])
    n = config.anchor_images
    template_ids = [i % len(request.templates) for i in range(n)]
    prompts = [render_prompt(request.templates[i], request.anchor) for i in template_ids]
    latents = backend.sample_latents(prompts, seed, config.cache_steps, config.cache_guidance)
    dropped = 0
    if image_filter is not None:
        keep = image_filter(latents, request)
        if int(keep.sum()) >= max(1, n // 4):
            dropped = int((~keep).sum())
            latents = latents[keep]
            template_ids = [t for t, k in zip(template_ids, keep.tolist()) if k]
    related_prompts = []
    for j, concept in enumerate(request.preserve):
        for i in range(config.related_images):
            related_prompts.append(render_prompt(request.templates[(i + j) % len(request.templates)], concept))
    related = (backend.sample_latents(related_prompts, seed + 10_000, config.cache_steps, config.cache_guidance)
               if related_prompts else latents[:0])
    target = None
    if get_method(config.method).objective == "negative_guidance":
        target_prompts = [render_prompt(request.templates[i % len(request.templates)], request.target) for i in range(n)]
        target = backend.sample_latents(target_prompts, seed + 20_000, config.cache_steps, config.cache_guidance)
    return RequestCache(request, latents, template_ids, related, related_prompts, dropped, target)


def _reduced_maps(store, mask) -> list[torch.Tensor]:
    return [reduce_token_maps(m, mask) for m in store.maps.values()]


def _predict(backend, zt, t, context, tokens, mask, config, capture: bool):
    """The UNet's output and, when `capture`, the token-reduced attention maps of the captured layers."""
    if not capture:
        return backend.predict_noise(zt, t, context), []
    with backend.capture_attention(config.attention_layers, tokens) as store:
        return backend.predict_noise(zt, t, context), _reduced_maps(store, mask)


@dataclass
class _Batch:
    """One step's samples, drawn whole (the same in every process and for any micro-batching).
    Row i of the anchor part: noised latent zt[i] at timestep t[i], prompts and words."""

    zt: torch.Tensor  # [b, C, h, w]
    t: torch.Tensor  # [b]
    target_prompts: list[str]
    anchor_prompts: list[str]
    target_words: list[str]
    tok_anchor: torch.Tensor  # [b, T] token indices of the anchor word
    mask_anchor: torch.Tensor  # [b, T] bool
    has_anchor: torch.Tensor  # [b] bool: the anchor has tokens (the attention term needs them)
    related_zt: torch.Tensor | None = None  # [r, C, h, w]
    related_t: torch.Tensor | None = None  # [r]
    related_prompts: list[str] = field(default_factory=list)


def _draw_batch(backend, caches: list[RequestCache], config: UnlearnConfig, rng: np.random.Generator,
                generator: torch.Generator, replay: int = 0) -> _Batch:
    """The samples of one step.

    `replay` > 0: the last cache is the current request, which fills `batch_size` samples, and
    `replay` samples are drawn from the earlier caches (replayed erasures). Otherwise the
    `batch_size` samples are drawn from all caches alike (one cache, or all when simultaneous).
    """
    method = get_method(config.method)
    device = backend.device
    if replay > 0 and len(caches) > 1:
        which = np.concatenate([np.full(config.batch_size, len(caches) - 1),
                                rng.integers(0, len(caches) - 1, replay)])
    else:
        which = rng.integers(0, len(caches), config.batch_size)
    anchor_z, target_prompts, anchor_prompts, target_words, anchor_words = [], [], [], [], []
    related_z, related_prompts = [], []
    for c in which:
        cache = caches[c]
        req = cache.request
        i = rng.integers(0, len(cache.anchor_latents))
        template = req.templates[cache.anchor_templates[i]]
        word = ([req.target] + list(req.aliases))[rng.integers(0, 1 + len(req.aliases))]
        if method.objective == "negative_guidance":
            i = rng.integers(0, len(cache.target_latents))
            template = req.templates[i % len(req.templates)]
            anchor_z.append(cache.target_latents[i])
        else:
            anchor_z.append(cache.anchor_latents[i])
        target_prompts.append(render_prompt(template, word))
        anchor_prompts.append(render_prompt(template, req.anchor))
        target_words.append(word)
        anchor_words.append(req.anchor)
        if len(cache.related_latents):
            j = rng.integers(0, len(cache.related_latents))
            related_z.append(cache.related_latents[j])
            related_prompts.append(cache.related_prompts[j])

    z0 = torch.stack(anchor_z).to(device)
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t = torch.randint(0, backend.num_train_timesteps, (len(which),), generator=generator).to(device)
    tok_anchor, mask_anchor = backend.token_indices(anchor_prompts, anchor_words)
    batch = _Batch(backend.add_noise(z0, noise, t), t, target_prompts, anchor_prompts, target_words,
                   tok_anchor, mask_anchor, mask_anchor.any(1))
    if related_z and method.prior_term and config.lambda_prior > 0:
        zr0 = torch.stack(related_z).to(device)
        noise_r = torch.randn(zr0.shape, generator=generator).to(device)
        t_r = torch.randint(0, backend.num_train_timesteps, (len(related_z),), generator=generator).to(device)
        batch.related_zt, batch.related_t = backend.add_noise(zr0, noise_r, t_r), t_r
        batch.related_prompts = related_prompts
    return batch


def micro_batches(rows: slice, size: int) -> list[slice]:
    """`rows` cut into consecutive slices of at most `size` rows (0: one slice)."""
    if size <= 0 or rows.stop - rows.start <= size:
        return [rows]
    return [slice(i, min(i + size, rows.stop)) for i in range(rows.start, rows.stop, size)]


def _request_step(backend, edits, caches: list[RequestCache], config: UnlearnConfig, rng: np.random.Generator,
                  generator: torch.Generator, fisher: dict | None, replay: int = 0,
                  micro_batch_size: int = 0) -> dict:
    """One optimisation step's loss over a batch drawn from `caches`, back-propagated into the
    trainable deltas' `.grad` (the caller zeroes them before and steps the optimiser after).

    Each process (duge.distributed) takes its rows of the batch, and those rows run through the
    UNet `micro_batch_size` at a time (0: all at once), each part's loss weighted by its share of
    the batch and back-propagated before the next part runs: the gradients add up to the whole
    batch's, while only one part's activations are alive at a time. The regulariser is
    back-propagated layer by layer for the same reason. Returns the loss values (floats).
    """
    method = get_method(config.method)
    batch = _draw_batch(backend, caches, config, rng, generator, replay)
    b = len(batch.t)
    use_attention = method.attention_term and config.beta > 0
    beta = config.beta if use_attention else 0.0
    totals = {"output": 0.0, "attention": 0.0, "total": 0.0}
    rows = shard_rows(b)
    for part in micro_batches(rows, micro_batch_size):
        zt, t = batch.zt[part], batch.t[part]
        target_prompts, anchor_prompts = batch.target_prompts[part], batch.anchor_prompts[part]
        tok_anchor, mask_anchor = batch.tok_anchor[part], batch.mask_anchor[part]
        # The attention term needs anchor tokens to look at: a sample whose anchor is the empty prompt
        # (a colour left unmentioned) is steered by the output term alone.
        has_anchor = batch.has_anchor[part].to(zt.device)
        ctx_target = backend.encode_prompts(target_prompts)
        ctx_anchor = backend.encode_prompts(anchor_prompts)
        tok_target, mask_target = backend.token_indices(target_prompts, batch.target_words[part])
        with torch.no_grad(), edits.reference():
            if method.objective == "negative_guidance":
                uncond = backend.encode_prompts([""] * len(target_prompts))
                ref_uncond = backend.predict_noise(zt, t, uncond)
                ref_anchor = ref_uncond - config.esd_eta * (backend.predict_noise(zt, t, ctx_target) - ref_uncond)
                maps_anchor = []
            else:
                ref_anchor, maps_anchor = _predict(backend, zt, t, ctx_anchor, tok_anchor, mask_anchor, config,
                                                   use_attention)
        if method.guided_anchor and config.anchor_guidance > 0:
            # away from the target as well as towards the anchor (the anchor's images still hold the
            # target now and then: an empty anchor draws every colour, red too). The direction is
            # the unedited model's, so a replayed row keeps the target its own request had.
            with torch.no_grad(), edits.disabled():
                direction = backend.predict_noise(zt, t, ctx_target) - backend.predict_noise(zt, t, ctx_anchor)
            ref_anchor = ref_anchor - config.anchor_guidance * direction
        pred_target, maps_target = _predict(backend, zt, t, ctx_target, tok_target, mask_target, config, use_attention)
        if use_attention:
            maps_target = [m[has_anchor] for m in maps_target] if has_anchor.any() else []
            maps_anchor = [m[has_anchor] for m in maps_anchor] if has_anchor.any() else []
        _, parts = cross_attention_loss(pred_target, ref_anchor, maps_target, maps_anchor, beta)
        # L_xattn = L_out + β·L_attn, each part weighted by this part's share of its rows in the batch
        output_weight = shard_weight(part, b)
        attention_weight = masked_shard_weight(part, batch.has_anchor)  # averages rows with anchor tokens only
        loss = output_weight * parts["output"] + beta * attention_weight * parts["attention"]
        loss.backward()
        totals["output"] += output_weight * float(parts["output"].detach())
        totals["attention"] += attention_weight * float(parts["attention"].detach())
        totals["total"] += float(loss.detach())

    if batch.related_zt is not None:
        count = len(batch.related_prompts)
        related_rows = shard_rows(count)
        for part in micro_batches(related_rows, micro_batch_size):
            if part.stop == part.start:
                continue
            zr, t_r = batch.related_zt[part], batch.related_t[part]
            ctx_r = backend.encode_prompts(batch.related_prompts[part])
            with torch.no_grad(), edits.reference():
                ref_r = backend.predict_noise(zr, t_r, ctx_r)
            loss_prior = prior_preservation_loss(backend.predict_noise(zr, t_r, ctx_r), ref_r)
            weight = shard_weight(part, count)
            loss = config.lambda_prior * weight * loss_prior
            loss.backward()
            totals["prior"] = totals.get("prior", 0.0) + weight * float(loss_prior.detach())
            totals["total"] += float(loss.detach())

    if method.regularizer and config.lambda_reg > 0:
        # Σ F·(θ − θ0)² on the total deltas θ − θ0 themselves (a 0-dim θ0 of zero), one layer at a time.
        # In every process (the regulariser is not sharded; the gradients are averaged over processes).
        loss_reg = 0.0
        for name, delta in edits.total_deltas().items():
            term = regularization_loss({name: delta}, {name: torch.zeros(())},
                                       {name: fisher[name]} if fisher is not None else None)
            (config.lambda_reg * term).backward()
            loss_reg += float(term.detach())
        totals["regularization"] = loss_reg
        totals["total"] += config.lambda_reg * loss_reg
    return totals


def choose_memory(backend, edits, params: list[torch.nn.Parameter], cache: RequestCache, config: UnlearnConfig,
                  rows: int):
    """Settle `config.gradient_checkpointing` / `micro_batch_size` when "auto" (duge.plan.choose_memory_settings).

    The activations one batch row keeps for the backward pass are measured: one row of `cache`
    through the UNet with gradient (attention captured as in training), counting the tensors autograd
    saves. The budget is `config.memory_budget_gib`, or the device's free memory now times
    `duge.plan.MEMORY_MARGIN`, less the gradients and AdamW moments the trainable `params` will need.
    """
    from .plan import MEMORY_MARGIN, MemoryChoice, choose_memory_settings, free_memory_bytes, saved_activation_bytes

    if config.gradient_checkpointing != "auto" and config.micro_batch_size != "auto":
        return MemoryChoice(bool(config.gradient_checkpointing), int(config.micro_batch_size), "as configured")
    optimizer_bytes = 12 * sum(p.numel() for p in params)  # gradients and AdamW's two moments, float32
    if config.memory_budget_gib is not None:
        budget = max(0.0, config.memory_budget_gib * 2**30 - optimizer_bytes)
    else:
        free = free_memory_bytes(backend.device)
        budget = None if free is None else max(0.0, (free - optimizer_bytes) * MEMORY_MARGIN)
    previous = backend.set_gradient_checkpointing(False)
    req = cache.request
    prompt = [render_prompt(req.templates[cache.anchor_templates[0]] if cache.anchor_templates else req.templates[0],
                            req.target)]
    latents = (cache.anchor_latents if len(cache.anchor_latents) else cache.target_latents)[:1].to(backend.device)
    t = torch.full((1,), backend.num_train_timesteps // 2, device=backend.device)
    tokens, mask = backend.token_indices(prompt, [req.target])
    context = backend.encode_prompts(prompt)
    use_attention = get_method(config.method).attention_term and config.beta > 0
    per_row = saved_activation_bytes(lambda: _predict(backend, latents, t, context, tokens, mask, config, use_attention))
    ratio = backend.gradient_checkpointing_ratio()
    backend.set_gradient_checkpointing(previous)
    return choose_memory_settings(rows, per_row, per_row * ratio if ratio else None, budget,
                                  config.gradient_checkpointing, config.micro_batch_size)


def estimate_fisher(backend, edits, prompts: list[str], config: UnlearnConfig, seed: int) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable weights at the current model: the mean squared gradient of
    the denoising loss on images generated from `prompts`, normalised to mean 1 (so λ_reg keeps
    the scale it has with L2-SP)."""
    generator = torch.Generator().manual_seed(seed)
    committed = [d.committed for d in edits.deltas.values()]
    fisher = {name: torch.zeros_like(d.committed) for name, d in edits.deltas.items()}
    latents = backend.sample_latents(prompts, seed, config.cache_steps, config.cache_guidance)
    ctx = backend.encode_prompts(prompts)
    for c in committed:
        c.requires_grad_(True)
    try:
        for i in range(len(prompts)):
            noise = torch.randn(latents[i : i + 1].shape, generator=generator).to(backend.device)
            t = torch.randint(0, backend.num_train_timesteps, (1,), generator=generator).to(backend.device)
            zt = backend.add_noise(latents[i : i + 1], noise, t)
            loss = torch.nn.functional.mse_loss(backend.predict_noise(zt, t, ctx[i : i + 1]), noise)
            grads = torch.autograd.grad(loss, committed, allow_unused=True)
            for name, g in zip(edits.deltas, grads):
                if g is not None:
                    fisher[name] += g.detach() ** 2 / len(prompts)
    finally:
        for c in committed:
            c.requires_grad_(False)
    mean = torch.stack([f.mean() for f in fisher.values()]).mean().clamp(min=1e-20)
    return {name: f / mean for name, f in fisher.items()}


def unlearn(backend, concept_set: ConceptSet, config: UnlearnConfig, builtin_world: bool = False,
            image_filter=None, evaluate=None, progress: ProgressFn | None = None,
            cancel: Callable[[], bool] | None = None, start_deltas: dict[str, torch.Tensor] | None = None,
            start_index: int = 0, resume: ResumeState | None = None,
            on_request_done: RequestDoneFn | None = None) -> UnlearnResult:
    """Erase the concept set's requests from the backend's model, in order.

    `evaluate(backend, requests_so_far) -> dict` is called after each request with the edits
    enabled (the current model). `progress(info)` receives step-level information. Raises
    UnlearnCancelled if `cancel()` returns True or on KeyboardInterrupt; the host is unchanged.
    `start_deltas` are deltas already on the model before request 0 (a continued ComfyUI session);
    `start_index` skips the first requests. `on_request_done(k, result, cache)` is called after
    request k is committed (`duge.progress` saves a checkpoint there); `resume` holds what such
    checkpoints recorded for requests 0..k-1, and the run continues at request k with the same
    committed deltas and replay caches, so it ends with the same weights as an uninterrupted run.
    """
    config.validate()
    check_batch(config.batch_size)
    if resume is not None and config.setting == "simultaneous":
        raise DugeError("a simultaneous run is one optimisation over every request and cannot be resumed; "
                        "start it again")
    method = get_method(config.method)
    requests = [resolve_request(r, builtin_world=builtin_world) for r in concept_set.requests]
    if config.setting != "independent":
        # A concept erased by an earlier request (or by any request, when simultaneous) is not
        # preserved later: preserving it would pull it back.
        for k, r in enumerate(requests):
            erased = {x.lower() for q in (requests if config.setting == "simultaneous" else requests[:k])
                      for x in [q.target, *q.aliases]}
            r.preserve = [p for p in r.preserve if p.lower() not in erased]
    results: list[RequestResult] = []
    memory: list = []  # the run's MemoryChoice, settled at the first request that trains
    checkpointing_before: list[bool] = []
    torch.manual_seed(config.seed)
    try:
        with backend.edits(trainable_pattern(config.trainable), mode=config.trainable_mode,
                           rank=config.lora_rank) as edits:
            fisher = None
            if config.regularizer == "fisher":
                prompts = list(concept_set.general_prompts) or [render_prompt(r.templates[0], r.anchor) for r in requests]
                fisher = estimate_fisher(backend, edits, prompts[: config.fisher_samples], config, config.seed + 7)
            if start_deltas:
                edits.load_committed(start_deltas)
            if resume is not None:
                start_index = len(resume.results)
                results.extend(resume.results)
                if config.setting == "sequential":
                    for done in resume.results:  # the same float32 additions as commit_request made
                        edits.add_committed(done.delta)

            def train(caches: list[RequestCache], steps: int, lr: float, seed: int, label: str,
                      replay: bool = False) -> tuple[dict, dict]:
                if method.objective == "closed_form":
                    from .uce import uce_delta

                    before = edits.committed()
                    delta = uce_delta(backend, edits, [c.request for c in caches], config)
                    edits.load_committed({name: before[name] + delta[name].to(before[name]) for name in before})
                    return delta, {}
                rng = np.random.default_rng(seed)
                generator = torch.Generator().manual_seed(seed)
                before = edits.committed()
                params = edits.start_request(seed)
                if not memory:  # once per run, at the first request that trains
                    rows = shard_rows(config.batch_size + (config.replay_batch_size if config.setting == "sequential" else 0))
                    memory.append(choose_memory(backend, edits, params, caches[-1], config, rows.stop - rows.start))
                    checkpointing_before.append(backend.set_gradient_checkpointing(memory[0].gradient_checkpointing))
                    logger.info("memory: gradient checkpointing %s, %s (%s)",
                                "on" if memory[0].gradient_checkpointing else "off",
                                f"micro-batches of {memory[0].micro_batch_size} rows" if memory[0].micro_batch_size
                                else "the whole batch in one pass", memory[0].reason)
                micro_batch_size = memory[0].micro_batch_size
                optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
                losses = {}

                def roll_back(problem: str) -> TrainingDiverged:
                    edits.discard_request()
                    edits.load_committed(before)
                    return TrainingDiverged(f"request '{label}': {problem}; the request was rolled back — "
                                            "lower the learning rate")

                for step in range(steps):
                    _check_cancel(cancel)
                    optimizer.zero_grad(set_to_none=True)
                    losses = _request_step(backend, edits, caches, config, rng, generator, fisher,
                                           replay=config.replay_batch_size if len(caches) > 1 and replay else 0,
                                           micro_batch_size=micro_batch_size)
                    if not math.isfinite(losses["total"]):
                        raise roll_back(f"loss became {losses['total']} at step {step + 1}")
                    average_gradients(params)  # over the processes of `accelerate launch`; else nothing
                    try:
                        optimizer.step()
                    except RuntimeError as err:  # AdamW's step size overflows float32 for an absurd learning rate
                        if "overflow" not in str(err):
                            raise
                        raise roll_back(f"the optimiser step overflowed at step {step + 1} (learning rate {lr:g})") from err
                    if not all(bool(torch.isfinite(p).all()) for p in params):
                        raise roll_back(f"a weight became NaN/inf at step {step + 1}")
                    if progress:
                        progress({"request": label, "step": step + 1, "steps": steps, "losses": losses})
                delta = edits.commit_request()
                if not all(torch.isfinite(d).all() for d in delta.values()):
                    edits.load_committed(before)
                    raise TrainingDiverged(f"request '{label}': a weight became NaN/inf; the request was rolled back")
                return delta, losses

            if config.setting == "simultaneous":
                t0 = time.time()
                with edits.reference():
                    caches = [load_or_build_request_cache(backend, r, config, config.seed + 100 * k, image_filter)
                              for k, r in enumerate(requests)]
                steps = sum(concept_set.requests[k].steps or config.steps for k in range(len(requests)))
                delta, losses = train(caches, steps, config.learning_rate, config.seed, "all requests")
                metrics = evaluate(backend, requests) if evaluate else {}
                results.append(RequestResult(", ".join(r.target for r in requests), delta, time.time() - t0,
                                             steps, losses, metrics))
            else:
                independent_deltas = [r.delta for r in resume.results] if resume is not None else []
                previous_caches: list[RequestCache] = list(resume.caches) if resume is not None else []
                for k, request in enumerate(requests):
                    if k < start_index:
                        continue
                    _check_cancel(cancel)
                    spec = concept_set.requests[k]
                    t0 = time.time()
                    if config.setting == "independent":
                        edits.reset()
                    seed = spec.seed if spec.seed is not None else config.seed + 100 * k
                    with edits.reference():
                        cache = load_or_build_request_cache(backend, request, config, seed, image_filter)
                    replayed = previous_caches if config.setting == "sequential" and config.replay_batch_size > 0 else []
                    delta, losses = train(replayed + [cache], spec.steps or config.steps,
                                          spec.learning_rate or config.learning_rate, seed, request.target,
                                          replay=bool(replayed))
                    previous_caches.append(cache)
                    seconds = time.time() - t0
                    metrics = evaluate(backend, requests[: k + 1]) if evaluate else {}
                    metrics["dropped_anchor_images"] = cache.dropped_anchor_images
                    results.append(RequestResult(request.target, delta, seconds, spec.steps or config.steps, losses, metrics))
                    independent_deltas.append(delta)
                    if on_request_done is not None:
                        on_request_done(k, results[-1], cache)
                if config.setting == "independent":
                    merged = {name: sum(d[name] for d in independent_deltas) for name in edits.deltas}
                    edits.load_committed(merged)
            total = edits.committed()
    except KeyboardInterrupt as err:
        raise UnlearnCancelled("unlearning interrupted; the model was left unchanged and nothing was written") from err
    finally:
        if checkpointing_before:
            backend.set_gradient_checkpointing(checkpointing_before[0])
    return UnlearnResult(config, results, total)


def config_dict(config: UnlearnConfig) -> dict:
    return asdict(config)

"""One optimisation step's objective (design doc §2):

    L = L_xattn + λ_prior · L_prior + λ_reg · L_reg,    L_xattn = L_out + β · L_attn

`OBJECTIVES` says, per method objective, which cached images a step's rows come from and what the
target prompt's prediction is steered to (its target, computed with the frozen reference model):

- anchor:            ε_φ(z_t, anchor), guided away from the target by `anchor_guidance` for DUGE
                     (ε_φ(a) − η_a·(ε_θ0(c) − ε_θ0(a))), with the anchor's attention maps;
- negative_guidance: ESD's ε_φ(z_t, ∅) − η·(ε_φ(z_t, c) − ε_φ(z_t, ∅)) on images of the target;
- closed_form:       no images and no steps (UCE, `duge.uce`).

`step_terms` draws a batch, back-propagates each term into the trainable deltas (rows in
micro-batches and shards through `duge.harness.accumulate`, the regulariser one layer at a time)
and returns the terms' values. The losses themselves are `duge.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .attention import reduce_token_maps
from .batches import Batch, draw_batch
from .config import UnlearnConfig
from .distributed import masked_shard_weight, shard_weight
from .harness import accumulate
from .image_cache import RequestCache
from .losses import cross_attention_loss, prior_preservation_loss, regularization_loss
from .methods import Method


def predict(backend, zt, t, context, tokens, mask, config: UnlearnConfig, capture: bool):
    """The UNet's output [b, C, h, w] and, when `capture`, the token-reduced attention maps of the captured layers."""
    if not capture:
        return backend.predict_noise(zt, t, context), []
    with backend.capture_attention(config.attention_layers, tokens) as store:
        return backend.predict_noise(zt, t, context), [reduce_token_maps(m, mask) for m in store.maps.values()]


def anchor_target(backend, edits, rows: Batch, ctx_target, ctx_anchor, method: Method, config: UnlearnConfig,
                  capture: bool):
    """ε_φ(z_t, anchor) and the anchor's maps; for a guided method also − η_a·(ε_θ0(target) − ε_θ0(anchor))."""
    with torch.no_grad(), edits.reference():
        target, maps = predict(backend, rows.zt, rows.t, ctx_anchor, rows.tok_anchor, rows.mask_anchor, config, capture)
    if method.guided_anchor and config.anchor_guidance > 0:
        # away from the target as well as towards the anchor (the anchor's images still hold the
        # target now and then: an empty anchor draws every colour, red too). The direction is
        # the unedited model's, so a replayed row keeps the target its own request had.
        with torch.no_grad(), edits.disabled():
            direction = backend.predict_noise(rows.zt, rows.t, ctx_target) - backend.predict_noise(rows.zt, rows.t, ctx_anchor)
        target = target - config.anchor_guidance * direction
    return target, maps


def negative_guidance_target(backend, edits, rows: Batch, ctx_target, ctx_anchor, method: Method,
                             config: UnlearnConfig, capture: bool):
    """ESD: ε_φ(z_t, ∅) − η·(ε_φ(z_t, c) − ε_φ(z_t, ∅)), no attention maps."""
    with torch.no_grad(), edits.reference():
        uncond = backend.predict_noise(rows.zt, rows.t, backend.encode_prompts([""] * len(rows.target_prompts)))
        return uncond - config.esd_eta * (backend.predict_noise(rows.zt, rows.t, ctx_target) - uncond), []


@dataclass(frozen=True)
class Objective:
    images: str | None  # the cached latents a row is drawn from: "anchor", "target" (esd-x), None (no training)
    target: Callable | None  # (backend, edits, rows, ctx_target, ctx_anchor, method, config, capture) -> (ε, maps)


OBJECTIVES = {
    "anchor": Objective("anchor", anchor_target),
    "negative_guidance": Objective("target", negative_guidance_target),
    "closed_form": Objective(None, None),
}


def xattn_part(backend, edits, batch: Batch, part: slice, method: Method, config: UnlearnConfig, beta: float):
    """L_out + β·L_attn on rows `part` of the batch, each part weighted by its share of the batch's rows."""
    rows = batch[part]
    ctx_target = backend.encode_prompts(rows.target_prompts)
    ctx_anchor = backend.encode_prompts(rows.anchor_prompts)
    tok_target, mask_target = backend.token_indices(rows.target_prompts, rows.target_words)
    target, maps_anchor = OBJECTIVES[method.objective].target(backend, edits, rows, ctx_target, ctx_anchor, method,
                                                              config, beta > 0)
    pred, maps_target = predict(backend, rows.zt, rows.t, ctx_target, tok_target, mask_target, config, beta > 0)
    if beta > 0:  # a row whose anchor has no tokens (the empty prompt) is steered by the output term alone
        has_anchor = rows.has_anchor.to(rows.zt.device)
        maps_target = [m[has_anchor] for m in maps_target] if has_anchor.any() else []
        maps_anchor = [m[has_anchor] for m in maps_anchor] if has_anchor.any() else []
    _, parts = cross_attention_loss(pred, target, maps_target, maps_anchor, beta)
    output_weight = shard_weight(part, len(batch.t))
    attention_weight = masked_shard_weight(part, batch.has_anchor)  # averages rows with anchor tokens only
    loss = output_weight * parts["output"] + beta * attention_weight * parts["attention"]
    return loss, {"output": output_weight * float(parts["output"].detach()),
                  "attention": attention_weight * float(parts["attention"].detach())}


def prior_part(backend, edits, batch: Batch, part: slice, config: UnlearnConfig):
    """λ_prior·L_prior on related rows `part`, weighted by their share of the related rows."""
    zr, t_r = batch.related_zt[part], batch.related_t[part]
    ctx = backend.encode_prompts(batch.related_prompts[part])
    with torch.no_grad(), edits.reference():
        reference = backend.predict_noise(zr, t_r, ctx)
    loss_prior = prior_preservation_loss(backend.predict_noise(zr, t_r, ctx), reference)
    weight = shard_weight(part, len(batch.related_prompts))
    return config.lambda_prior * weight * loss_prior, {"prior": weight * float(loss_prior.detach())}


def regularization(edits, fisher: dict | None, weight: float) -> float:
    """L_reg = Σ F·(θ − θ0)² on the total deltas θ − θ0 (a 0-dim θ0 of zero), back-propagated one layer at a
    time (scaled by `weight`) in every process: the regulariser is not sharded."""
    value = 0.0
    for name, delta in edits.total_deltas().items():
        term = regularization_loss({name: delta}, {name: torch.zeros(())},
                                   {name: fisher[name]} if fisher is not None else None)
        (weight * term).backward()
        value += float(term.detach())
    return value


def step_terms(backend, edits, caches: list[RequestCache], method: Method, config: UnlearnConfig,
               rng: np.random.Generator, generator: torch.Generator, fisher: dict | None, replay: int = 0,
               micro_batch_size: int = 0) -> dict[str, float]:
    """One step's loss over a batch drawn from `caches`, back-propagated into the trainable deltas'
    `.grad` (the caller zeroes them before and steps the optimiser after). Returns each term's value."""
    batch = draw_batch(backend, caches, method, config, rng, generator, replay)
    beta = config.beta if method.attention_term and config.beta > 0 else 0.0
    terms = accumulate(len(batch.t), micro_batch_size,
                       lambda part: xattn_part(backend, edits, batch, part, method, config, beta))
    xattn = terms["output"] + beta * terms["attention"]
    prior = reg = 0.0
    if batch.related_zt is not None:
        prior = terms["prior"] = accumulate(len(batch.related_prompts), micro_batch_size,
                                            lambda part: prior_part(backend, edits, batch, part, config)).get("prior", 0.0)
    if method.regularizer and config.lambda_reg > 0:
        reg = terms["regularization"] = regularization(edits, fisher, config.lambda_reg)
    terms["total"] = xattn + config.lambda_prior * prior + config.lambda_reg * reg
    return terms

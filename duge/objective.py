"""One optimisation step's objective (design doc §2):

    L = L_xattn + λ_prior · L_prior + λ_reg · L_reg,    L_xattn = L_out + β · L_attn

What the target prompt's prediction is steered to is the method objective's entry in
`duge.targets.OBJECTIVES` (anchor / negative guidance / closed form), computed with the frozen
reference model; the teacher pools of `duge.teachers` compute the same targets once per request.

`step_terms` draws a batch, back-propagates each term into the trainable deltas (rows in
micro-batches and shards through `duge.harness.accumulate`, the regulariser one layer at a time)
and returns the terms' values; `pooled_step_terms` does the same against the teacher pools. Both
end in `with_total`, which adds L_reg and sums L. The losses themselves are `duge.losses`.
"""

from __future__ import annotations

import numpy as np
import torch

from .backends.base import Backend
from .adversarial import AttackInputs, with_attacks
from .batches import Batch, draw_batch, learnt_conditioning
from .config import UnlearnConfig
from .distributed import masked_shard_weight, shard_weight
from .edits import LayerEdits
from .harness import accumulate
from .image_cache import RequestCache
from .losses import cross_attention_loss, prior_preservation_loss, regularization_loss
from .methods import Method
from .preservation import preservation_penalty, preservation_penalty_grad
from .targets import OBJECTIVES, RelatedRows, predict
from .teachers import PoolRows, TeacherPool, draw_pool_rows


def weighted_xattn(pred, target, maps_target, maps_anchor, beta: float, part: slice, has_anchor: torch.Tensor):
    """L_out + β·L_attn (`cross_attention_loss`) on rows `part` of a batch whose rows' anchors have tokens where
    `has_anchor` [B] (bool); each term weighted by the part's share of the rows it averages over."""
    keep = has_anchor[part].to(pred.device)
    if beta > 0:  # a row whose anchor has no tokens (the empty prompt) is steered by the output term alone
        maps_target = [m[keep] for m in maps_target] if keep.any() else []
        maps_anchor = [m[keep] for m in maps_anchor] if keep.any() else []
    _, parts = cross_attention_loss(pred, target, maps_target, maps_anchor, beta)
    output_weight = shard_weight(part, len(has_anchor))
    attention_weight = masked_shard_weight(part, has_anchor)  # averages rows with anchor tokens only
    loss = output_weight * parts["output"] + beta * attention_weight * parts["attention"]
    return loss, {"output": output_weight * float(parts["output"].detach()),
                  "attention": attention_weight * float(parts["attention"].detach())}


def split_part(part: slice, anchor_rows: int) -> tuple[slice, slice]:
    """Rows `part` of a step's rows — `anchor_rows` anchor rows, then the related rows — as (anchor rows,
    related rows), each indexing its own part."""
    return (slice(min(part.start, anchor_rows), min(part.stop, anchor_rows)),
            slice(max(part.start, anchor_rows) - anchor_rows, max(part.stop, anchor_rows) - anchor_rows))


def trainable_part(backend: Backend, rows: Batch, part: slice, config: UnlearnConfig, beta: float, target,
                   maps_anchor: list, related_target):
    """L_out + β·L_attn + λ_prior·L_prior on rows `part` of a step's rows — the anchor rows, then the related
    rows — in ONE trainable UNet call, against the part's frozen targets: `target` [n] and `maps_anchor` of its
    n anchor rows, `related_target` [m] of its related rows. Each term weighted by the part's share of its rows.
    The trainable pass reads the rows' `trained_prompts` where set (attack prompts) and their `learnt_tokens`'
    conditioning and target-word positions where set (attack embeddings); the teachers read neither."""
    b, r = len(rows.t), len(rows.related_prompts)
    anchor, related = split_part(part, b)
    n = anchor.stop - anchor.start
    trained = rows.trained_prompts if rows.trained_prompts is not None else rows.target_prompts
    prompts = trained[anchor] + rows.related_prompts[related]
    words = rows.target_words[anchor] + [""] * (related.stop - related.start)
    zt = torch.cat([rows.zt[anchor]] + ([rows.related_zt[related]] if r else []))
    t = torch.cat([rows.t[anchor]] + ([rows.related_t[related]] if r else []))
    tokens, mask = backend.token_indices(prompts, words)
    context = backend.encode_prompts(prompts)
    if rows.learnt_tokens is not None:
        context, tokens, mask = learnt_conditioning(context, tokens, mask, rows.learnt_tokens[anchor])
    pred, maps = predict(backend, zt, t, context, tokens, mask, config, beta > 0 and n > 0)
    loss, values = pred.new_zeros(()), {}
    if n:
        loss, values = weighted_xattn(pred[:n], target, [m[:n] for m in maps], maps_anchor, beta, anchor,
                                      rows.has_anchor)
    if related.stop > related.start:
        loss_prior = prior_preservation_loss(pred[n:], related_target)
        weight = shard_weight(related, r)
        loss = loss + config.lambda_prior * weight * loss_prior
        values["prior"] = weight * float(loss_prior.detach())
    return loss, values


def step_part(backend: Backend, edits: LayerEdits, batch: Batch, part: slice, method: Method, config: UnlearnConfig,
              beta: float):
    """`trainable_part` on rows `part` of a step's batch, the frozen teachers run now (`duge.targets`): the
    reference on the part's anchor and related rows in one UNet call, then the trainable pass."""
    anchor, related = split_part(part, len(batch.t))
    related_rows = RelatedRows(batch.related_zt[related], batch.related_t[related], batch.related_prompts[related]) \
        if related.stop > related.start else None
    target, maps_anchor, reference = OBJECTIVES[method.objective].target(backend, edits, batch[anchor], method,
                                                                         config, beta > 0, related_rows)
    return trainable_part(backend, batch, part, config, beta, target, maps_anchor, reference)


def _add_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad.detach().clone() if param.grad is None else param.grad + grad


def regularization(edits: LayerEdits, kind: str, fisher: dict | None, moments: dict, weight: float) -> float:
    """L_reg's value; its gradient times `weight` is added to the trainable deltas' `.grad`, one layer at a
    time, in every process (the regulariser is not sharded).

    - l2sp / fisher: Σ F·(θ − θ0)² on the total deltas θ − θ0, gradient 2F·(θ − θ0);
    - penalty: Σ_layers tr(ΔW C ΔWᵀ) on the request's delta ΔW, gradient 2ΔW C (`duge.preservation`;
      `moments`: layer name → C, layers without one are not penalised).
    Full deltas get the gradient in closed form (no backward pass); LoRA deltas through autograd.
    """
    value = 0.0
    for name, d in edits.deltas.items():
        if kind == "penalty" and name not in moments:
            continue
        if d.mode == "full" and d.delta is not None:
            with torch.no_grad():
                if kind == "penalty":
                    term, grad = preservation_penalty(d.delta, moments[name]), preservation_penalty_grad(d.delta, moments[name])
                else:
                    total = d.total_delta()
                    scale = fisher[name] if fisher is not None else 1.0
                    term, grad = (scale * total.square()).sum(), 2 * scale * total
            _add_grad(d.delta, weight * grad)
        else:
            if kind == "penalty":
                term = preservation_penalty(d.request_delta(), moments[name])
            else:
                term = regularization_loss({name: d.total_delta()}, {name: torch.zeros(())},
                                           {name: fisher[name]} if fisher is not None else None)
            (weight * term).backward()
        value += float(term.detach())
    return value


def with_total(terms: dict[str, float], edits: LayerEdits, method: Method, config: UnlearnConfig, beta: float,
               fisher: dict | None, moments: dict | None) -> dict[str, float]:
    """`terms` (the back-propagated output, attention and prior terms' values) with λ_reg·L_reg's gradient added
    into the deltas (if the method has a regulariser) and the step's total L."""
    kind = method.regularizer_kind(config.regularizer)
    if kind in ("l2sp", "fisher", "penalty") and config.lambda_reg > 0:
        terms["regularization"] = regularization(edits, kind, fisher, moments or {}, config.lambda_reg)
    xattn = terms.get("output", 0.0) + beta * terms.get("attention", 0.0)
    prior, reg = terms.get("prior", 0.0), terms.get("regularization", 0.0)
    terms["total"] = xattn + config.lambda_prior * prior + config.lambda_reg * reg
    return terms


def step_terms(backend: Backend, edits: LayerEdits, caches: list[RequestCache], method: Method, config: UnlearnConfig,
               rng: np.random.Generator, generator: torch.Generator, fisher: dict | None, replay: int = 0,
               micro_batch_size: int = 0, step: int = 0, moments: dict | None = None,
               attacks: AttackInputs | None = None) -> dict[str, float]:
    """One step's loss over a batch drawn from `caches`, its teachers run now, back-propagated into the
    trainable deltas' `.grad` (the caller zeroes them before and steps the optimiser after). Returns each
    term's value: total = xattn + λ_prior·prior + λ_reg·reg. `attacks`: the current request's attack prompts
    or embeddings (`duge.adversarial`), put into every other of its rows in the trainable pass
    (`duge.adversarial.with_attacks`)."""
    batch = with_attacks(backend, draw_batch(backend, caches, method, config, rng, generator, replay, step),
                         attacks, config.batch_size, step)
    beta = config.beta if method.attention_term and config.beta > 0 else 0.0
    count = len(batch.t) + len(batch.related_prompts)  # the anchor rows, then the related rows (if the prior term has any)
    terms = accumulate(count, micro_batch_size, lambda part: step_part(backend, edits, batch, part, method, config, beta))
    return with_total(terms, edits, method, config, beta, fisher, moments)


def pooled_part(backend: Backend, drawn: PoolRows, part: slice, config: UnlearnConfig, beta: float):
    """`trainable_part` on rows `part` of a step's pooled rows, against the pools' frozen targets."""
    anchor, related = split_part(part, len(drawn.rows.t))
    return trainable_part(backend, drawn.rows, part, config, beta, drawn.target[anchor],
                          [m[anchor] for m in drawn.anchor_maps],
                          drawn.related_target[related] if drawn.related_target is not None else None)


def pooled_step_terms(backend: Backend, edits: LayerEdits, pools: list[TeacherPool], method: Method,
                      config: UnlearnConfig,
                      rng: np.random.Generator, fisher: dict | None, replay: int = 0, micro_batch_size: int = 0,
                      step: int = 0, moments: dict | None = None, attacks: AttackInputs | None = None) -> dict[str, float]:
    """`step_terms` with the teachers computed once per request (`duge.teachers`): the step's rows come from
    the pools (the last is the current request's, `replay` rows from the earlier ones) and only the
    trainable pass runs, anchor and related rows in the same UNet call."""
    drawn = draw_pool_rows(pools, config, rng, step, replay, backend.device)
    drawn.rows = with_attacks(backend, drawn.rows, attacks, config.batch_size, step)
    beta = config.beta if method.attention_term and config.beta > 0 else 0.0
    count = len(drawn.rows.t) + (len(drawn.rows.related_prompts) if method.prior_term and config.lambda_prior > 0 else 0)
    if count == len(drawn.rows.t):
        drawn.rows.related_prompts, drawn.related_target = [], None
    terms = accumulate(count, micro_batch_size, lambda part: pooled_part(backend, drawn, part, config, beta))
    return with_total(terms, edits, method, config, beta, fisher, moments)

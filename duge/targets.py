"""The targets of each method objective, as a table (design doc §2): `OBJECTIVES`.

Per objective: which cached images a step's rows come from, and what the target prompt's prediction
is steered to, computed with the frozen reference model ε_φ (the model as the last request left it):

- anchor:            ε_φ(z_t, anchor), guided away from the target by `anchor_guidance` for DUGE
                     (ε_φ(a) − η_a·(ε_θ0(c) − ε_θ0(a))), with the anchor's attention maps;
- negative_guidance: ESD's ε_φ(z_t, ∅) − η·(ε_φ(z_t, c) − ε_φ(z_t, ∅)) on images of the target;
- closed_form:       no images and no steps (UCE, `duge.uce`).

`duge.objective` puts them into a step's loss; `duge.teachers` computes them once per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import reduce_token_maps
from .backends.base import Backend
from .batches import Batch
from .config import UnlearnConfig
from .edits import LayerEdits
from .methods import Method


def predict(backend: Backend, zt, t, context, tokens, mask, config: UnlearnConfig, capture: bool):
    """The UNet's output [b, C, h, w] and, when `capture`, the token-reduced attention maps of the captured layers."""
    if not capture:
        return backend.predict_noise(zt, t, context), []
    with backend.capture_attention(config.attention_layers, tokens) as store:
        return backend.predict_noise(zt, t, context), [reduce_token_maps(m, mask) for m in store.maps.values()]


@dataclass
class RelatedRows:
    """Rows whose reference prediction ε_φ a step needs beside its targets (the prior term's related rows):
    they join the reference pass of the objective's target, so both come from one UNet call."""

    zt: torch.Tensor  # [m, C, h, w]
    t: torch.Tensor  # [m]
    prompts: list[str]


def _reference_pass(backend: Backend, zt, t, prompts: list[str], related: RelatedRows | None, config: UnlearnConfig,
                    tokens=None, mask=None):
    """ε_φ(z_t, prompt) on n rows [n, C, h, w], then on the related rows, in ONE UNet call without gradients
    (the caller selects φ, the reference model). Returns (ε of the n rows, their maps of the `tokens` [n, K]
    columns — [] without tokens —, ε of the related rows [m] or None)."""
    n = len(t)
    if related is not None:
        zt, t, prompts = torch.cat([zt, related.zt]), torch.cat([t, related.t]), list(prompts) + list(related.prompts)
        if tokens is not None:  # the related rows capture no token
            tokens = torch.cat([tokens, tokens.new_zeros(len(related.t), tokens.shape[1])])
            mask = torch.cat([mask, mask.new_zeros(len(related.t), mask.shape[1])])
    with torch.no_grad():
        out, maps = predict(backend, zt, t, backend.encode_prompts(prompts), tokens, mask, config,
                            tokens is not None and n > 0)
    return out[:n], [layer[:n] for layer in maps], (out[n:] if related is not None else None)


def anchor_target(backend: Backend, edits: LayerEdits, rows: Batch, method: Method, config: UnlearnConfig,
                  capture: bool, related: RelatedRows | None = None):
    """ε_φ(z_t, anchor) and the anchor's maps; for a guided method also − η_a·(ε_θ0(target) − ε_θ0(anchor)).
    With `related`, also ε_φ on those rows, from the same UNet call as ε_φ(z_t, anchor)."""
    tokens, mask = (rows.tok_anchor, rows.mask_anchor) if capture else (None, None)
    with edits.reference():
        target, maps, related_reference = _reference_pass(backend, rows.zt, rows.t, rows.anchor_prompts, related,
                                                          config, tokens, mask)
    n = len(rows.t)
    if method.guided_anchor and config.anchor_guidance > 0 and n:
        # away from the target as well as towards the anchor (the anchor's images still hold the
        # target now and then: an empty anchor draws every colour, red too). The direction is
        # the unedited model's, so a replayed row keeps the target its own request had.
        with torch.no_grad(), edits.disabled():
            if edits.reference_is_original():  # nothing committed: ε_θ0(anchor) is the ε_φ(anchor) above
                direction = backend.predict_noise(rows.zt, rows.t, backend.encode_prompts(rows.target_prompts)) - target
            else:  # ε_θ0(target) and ε_θ0(anchor) from one UNet call
                both = backend.predict_noise(torch.cat([rows.zt, rows.zt]), torch.cat([rows.t, rows.t]),
                                             backend.encode_prompts(rows.target_prompts + rows.anchor_prompts))
                direction = both[:n] - both[n:]
        target = target - config.anchor_guidance * direction
    return target, maps, related_reference


def negative_guidance_target(backend: Backend, edits: LayerEdits, rows: Batch, method: Method, config: UnlearnConfig,
                             capture: bool, related: RelatedRows | None = None):
    """ESD: ε_φ(z_t, ∅) − η·(ε_φ(z_t, c) − ε_φ(z_t, ∅)), no attention maps; both predictions (and ε_φ on the
    `related` rows) from one UNet call."""
    n = len(rows.t)
    with edits.reference():
        both, _, related_reference = _reference_pass(backend, torch.cat([rows.zt, rows.zt]),
                                                     torch.cat([rows.t, rows.t]), [""] * n + list(rows.target_prompts),
                                                     related, config)
    uncond, conditional = both[:n], both[n:]
    return uncond - config.esd_eta * (conditional - uncond), [], related_reference


@dataclass(frozen=True)
class Objective:
    images: str | None  # the cached latents a row is drawn from: "anchor", "target" (esd-x), None (no training)
    # (backend, edits, rows, method, config, capture, related=None) -> (ε [n], maps, ε_φ of the related rows or None)
    target: Callable | None


OBJECTIVES = {
    "anchor": Objective("anchor", anchor_target),
    "negative_guidance": Objective("target", negative_guidance_target),
    "closed_form": Objective(None, None),
}

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


def anchor_target(backend: Backend, edits: LayerEdits, rows: Batch, ctx_target, ctx_anchor, method: Method,
                  config: UnlearnConfig, capture: bool):
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


def negative_guidance_target(backend: Backend, edits: LayerEdits, rows: Batch, ctx_target, ctx_anchor, method: Method,
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

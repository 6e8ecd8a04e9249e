"""DUGE and the baselines it is measured against, as data the one trainer reads (design doc §2).

Each method says which loss terms the trainer sums and what the target prompt is steered to:

- duge:    L_out + β·L_attn (target prompt → anchor's prediction on anchor images, optionally
           guided away from the target: ε_φ(a) − η_a·(ε_φ(c) − ε_φ(a)), `anchor_guidance`)
           + λ_prior·L_prior + λ_reg·L_reg
- ca:      Concept Ablation (Kumari et al. 2023): the output term alone
- ft-l2sp: plain fine-tuning of the same output term with the L2-SP regulariser
- esd-x:   ESD on cross-attention K/V (Gandikota et al. 2023): on images of the target,
           ε_θ(z_t, c) → ε_φ(z_t, ∅) − η·(ε_φ(z_t, c) − ε_φ(z_t, ∅))  (negative guidance)
- uce:     Unified Concept Editing (Gandikota et al. 2024): closed-form edit of the K/V weights
           (no training; see `duge.uce`)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DugeError


@dataclass(frozen=True)
class Method:
    name: str
    attention_term: bool  # β·L_attn inside L_xattn
    prior_term: bool  # λ_prior·L_prior
    regularizer: bool  # λ_reg·L_reg
    objective: str  # "anchor" | "negative_guidance" | "closed_form"
    guided_anchor: bool = False  # UnlearnConfig.anchor_guidance applies
    fixed_regularizer: str | None = None  # the regulariser this method always uses (else UnlearnConfig.regularizer)
    pooled_teachers: bool = False  # UnlearnConfig.teacher_pool applies (duge.teachers)

    def regularizer_kind(self, configured: str) -> str:
        """The regulariser a run of this method uses: its own fixed one, or the configured one; "none" without."""
        return (self.fixed_regularizer or configured) if self.regularizer else "none"


METHODS = {
    "duge": Method("duge", attention_term=True, prior_term=True, regularizer=True, objective="anchor",
                   guided_anchor=True, pooled_teachers=True),
    "ca": Method("ca", attention_term=False, prior_term=False, regularizer=False, objective="anchor"),
    "ft-l2sp": Method("ft-l2sp", attention_term=False, prior_term=False, regularizer=True, objective="anchor",
                      fixed_regularizer="l2sp"),
    "esd-x": Method("esd-x", attention_term=False, prior_term=False, regularizer=False, objective="negative_guidance"),
    "uce": Method("uce", attention_term=False, prior_term=False, regularizer=False, objective="closed_form"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise DugeError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None

"""DUGE and the baselines it is measured against, as data the one trainer reads (design doc §2).

Each method says which loss terms the trainer sums, what the target prompt is steered to, and
its own default settings (`Method.defaults`, applied by `duge.config.method_config`) — a baseline runs as its
paper or reference script runs it, not with DUGE's settings:

- duge:    L_out + β·L_attn (target prompt → anchor's prediction on anchor images, optionally
           guided away from the target: ε_φ(a) − η_a·(ε_φ(c) − ε_φ(a)), `anchor_guidance`)
           + λ_prior·L_prior + λ_reg·L_reg, with replay of earlier requests
- ca:      Concept Ablation (Kumari et al., ICCV 2023): the output term alone (model-based variant),
           on the cross-attention K/V ("cross-attn" parameter group of the authors' train.py)
- ft-l2sp: plain fine-tuning of the same output term with the L2-SP regulariser (Li et al., ICML 2018)
- esd-x:   ESD-x (Gandikota et al., ICCV 2023): every cross-attention projection ("xattn" in the
           authors' train-esd.py), on images of the target,
           ε_θ(z_t, c) → ε_φ(z_t, ∅) − η·(ε_φ(z_t, c) − ε_φ(z_t, ∅))  (negative guidance, η = 1)
- uce:     Unified Concept Editing (Gandikota et al., WACV 2024): closed-form edit of the K/V
           weights (no training; see `duge.uce`), sequential: each request edits the current
           weights with its own erase and preserve sets only
- uce-resolve: the same closed form, every request so far solved again from θ0 at each request

Replay (`replay_batch_size`) is DUGE's mechanism; none of the baselines' papers has it, so it is
off in their defaults. Values marked "tuning" were chosen by the tuning protocol of
`benchmarks/continual.py --tune` (benchmarks/results/tuning/tuning.json), on a tuning sequence that
is not a reported one; the others are the paper's (see the README for which runs of the grid ran).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .errors import DugeError


@dataclass(frozen=True)
class Method:
    name: str
    attention_term: bool  # β·L_attn inside L_xattn
    prior_term: bool  # λ_prior·L_prior
    regularizer: bool  # λ_reg·L_reg
    objective: str  # "anchor" | "negative_guidance" | "closed_form"
    guided_anchor: bool = False  # UnlearnConfig.anchor_guidance applies
    resolve_from_original: bool = False  # closed form: all requests so far, solved from θ0 each time
    defaults: Mapping[str, object] = field(default_factory=dict)  # UnlearnConfig fields this method sets
    reference: str = ""  # where `defaults` come from
    fixed_regularizer: str | None = None  # the regulariser this method always uses (else UnlearnConfig.regularizer)
    pooled_teachers: bool = False  # UnlearnConfig.teacher_pool applies (duge.teachers)
    # Where benchmarks/continual.py --tune's grid starts (learning rate r, steps S; gradient methods): the
    # paper's values, or the first that erased on the built-in model; `defaults` then hold the grid's choice.
    tuning_start: Mapping[str, object] = field(default_factory=dict)

    @property
    def seed_independent(self) -> bool:
        """True for a closed form: it draws no images and no noise, so its edit (and a measurement with fixed
        measuring seeds) is the same for every training seed; one run stands for all of them."""
        return self.objective == "closed_form"

    def regularizer_kind(self, configured: str) -> str:
        """The regulariser a run of this method uses: its own fixed one, or the configured one; "none" without."""
        return (self.fixed_regularizer or configured) if self.regularizer else "none"


METHODS = {
    "duge": Method("duge", attention_term=True, prior_term=True, regularizer=True, objective="anchor",
                   guided_anchor=True, pooled_teachers=True, reference="UnlearnConfig's defaults (docs/method.md)",
                   tuning_start={"learning_rate": 2e-3, "steps": 150}),
    "ca": Method(
        "ca", attention_term=False, prior_term=False, regularizer=False, objective="anchor",
        # Kumari et al. 2023, github.com/nupurkmr9/concept-ablation train.py: parameter_group
        # "cross-attn" (K/V), batch 8, learning rate 2e-6 scaled by the batch (--scale_lr: 1.6e-5), 400 steps.
        # That lr erased nothing on the built-in model (tuning sequence UA 0.03); tuning (4 of 4 runs, highest
        # H): 100× it, 1.6e-3, at the authors' 400 steps (UA 0.86, IRA 1.00; 1.6e-4: UA 0.67; 200 steps: H 0.93).
        defaults={"trainable": "kv", "batch_size": 8, "learning_rate": 1.6e-3, "steps": 400,
                  "replay_batch_size": 0},
        tuning_start={"learning_rate": 1.6e-5, "steps": 400},
        reference="Kumari et al., Ablating Concepts in Text-to-Image Diffusion Models (ICCV 2023)"),
    "ft-l2sp": Method(
        "ft-l2sp", attention_term=False, prior_term=False, regularizer=True, objective="anchor",
        fixed_regularizer="l2sp",
        # No unlearning paper: DUGE's output term and L2-SP weight, trained on K/V without replay; lr 2e-2
        # from the tuning (4 of 4 runs, highest H: 2e-3 erased UA 0.25, 2e-2 0.47, 2e-1 0.90 with IRA 0.63).
        defaults={"trainable": "kv", "batch_size": 8, "learning_rate": 2e-2, "steps": 150, "replay_batch_size": 0},
        tuning_start={"learning_rate": 2e-3, "steps": 150},  # DUGE's
        reference="Li et al., Explicit Inductive Bias for Transfer Learning with CNNs (L2-SP, ICML 2018)"),
    "esd-x": Method(
        "esd-x", attention_term=False, prior_term=False, regularizer=False, objective="negative_guidance",
        # Gandikota et al. 2023, github.com/rohitgandikota/erasing train-esd.py: train_method "xattn"
        # (every parameter of attn2: q, k, v, out), 1000 iterations of one image, negative_guidance 1, lr 1e-5.
        # That lr erased nothing on the built-in model (UA 0.04); tuning (4 of 4 runs from 1e-4, highest H):
        # 1e-4 at 500 steps (H 0.86; 1000 steps: UA 0.92 but IRA 0.64, H 0.71; 1e-3, 1e-2: IRA ≤ 0.19).
        defaults={"trainable": "attn2", "batch_size": 1, "learning_rate": 1e-4, "steps": 500, "esd_eta": 1.0,
                  "replay_batch_size": 0},
        tuning_start={"learning_rate": 1e-4, "steps": 1000},  # the paper's 1e-5 ran too (UA 0.04), outside the grid
        reference="Gandikota et al., Erasing Concepts from Diffusion Models (ICCV 2023)"),
    "uce": Method(
        "uce", attention_term=False, prior_term=False, regularizer=False, objective="closed_form",
        # train-scripts/train_erase.py of rohitgandikota/unified-concept-editing: edit_model(lamb=0.5,
        # erase_scale=1, preserve_scale=0.1 (--preserve_scale default)), K and V, technique "replace";
        # tuning (4 of 4 runs): preserve_scale 1 (trainscripts/uce_sd_erase.py's default) kept most.
        defaults={"trainable": "kv", "uce_lambda": 0.5, "uce_erase_scale": 1.0, "uce_preserve_scale": 1.0,
                  "replay_batch_size": 0},
        reference="Gandikota et al., Unified Concept Editing in Diffusion Models (WACV 2024)"),
    "uce-resolve": Method(
        "uce-resolve", attention_term=False, prior_term=False, regularizer=False, objective="closed_form",
        resolve_from_original=True,  # tuning (4 of 4 runs): λ 0.1, preserve scale 0.1
        defaults={"trainable": "kv", "uce_lambda": 0.1, "uce_erase_scale": 1.0, "uce_preserve_scale": 0.1,
                  "replay_batch_size": 0},
        reference="Gandikota et al. (WACV 2024), all requests so far edited at once from θ0"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise DugeError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None

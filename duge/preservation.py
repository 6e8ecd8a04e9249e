"""Preservation in the input space of the edited K/V projections (design doc §2.1).

A cross-attention key or value projection W [out, in] reads the text encoder's states x [in]. An
edit ΔW moves the projection's output for x by ΔW·x, so the outputs that must stay are protected
by a second-moment matrix of those inputs,

    C = Σ_g (1/|g|) Σ_{x ∈ g} x xᵀ / (number of groups),  scaled so that tr(C) = in,

over every position (start, words, end-of-text and padding) of the prompts of each group g: the
request's templates and anchor, its preserved concepts, concepts never erased, general vocabulary,
and the targets of earlier requests and what an earlier run on the model erased (their outputs are
already edited and must stay edited). The scale makes C = I the identity of L2-SP, so weights and μ
keep their meaning across models.

C (`preservation_moments`, per request) is used in one of two ways:
- a penalty `tr(ΔW C ΔWᵀ)` = the mean squared change of the protected outputs, gradient `2 ΔW C`
  (the regulariser of `duge.objective`);
- a projection of each optimiser update onto C's soft null space (`projected_parameters`, and
  `projected_updates` around the trainer's optimiser step),
  `ΔW ← ΔW (I − C (C + μI)⁻¹) = ΔW · μ (C + μI)⁻¹`: a direction of C with eigenvalue λ keeps the
  share μ / (λ + μ) of the update (AlphaEdit, ICLR 2025, projects onto the eigenvectors whose
  eigenvalue is below a threshold; SPEED and CUIG's gradient projection do the same). μ = 0 gives
  that hard projector with the threshold at numerical rank.

C costs one text-encoder pass over the prompts and no UNet pass; it is [in, in] for text width
`in`, the same for every projection that reads the text states.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .backends.base import Backend
from .conditioning import text_hidden_states
from .concepts import ResolvedRequest, erased_keys, render_prompt
from .edits import LayerEdits
from .world.vocabulary import CONCEPTS, FILLER_WORDS, GENERIC_WORD

# General vocabulary on a user's model (the built-in world uses its own words, `world_vocabulary`):
# common caption words, each encoded alone, so that their states' outputs stay.
GENERAL_WORDS = (
    "a", "an", "the", "of", "and", "with", "in", "on", "photo", "picture", "image", "painting", "drawing",
    "art", "style", "portrait", "landscape", "person", "man", "woman", "child", "face", "people", "dog", "cat",
    "bird", "horse", "car", "house", "building", "city", "street", "tree", "flower", "forest", "mountain",
    "sky", "sea", "water", "river", "beach", "room", "table", "chair", "food", "book", "red", "blue",
    "green", "yellow", "black", "white", "colorful", "bright", "dark", "old", "new", "small", "large",
    "beautiful", "detailed", "realistic",
)

GROUPS = ("templates", "preserved", "never_erased", "vocabulary", "erased")


@dataclass
class PreservedPrompts:
    """The prompts whose text states' K/V outputs must stay, by group (see the module doc)."""

    templates: list[str] = field(default_factory=list)  # each template with the anchor and with no word
    preserved: list[str] = field(default_factory=list)  # the request's preserved concepts in its templates
    never_erased: list[str] = field(default_factory=list)  # other concepts never erased, in its templates
    vocabulary: list[str] = field(default_factory=list)  # general words alone, and the set's general prompts
    erased: list[str] = field(default_factory=list)  # earlier requests' targets (every name) in their templates,
    # and an earlier run's erased names in the templates of the request(s) trained

    def groups(self) -> dict[str, list[str]]:
        return {name: getattr(self, name) for name in GROUPS}


def world_vocabulary() -> list[str]:
    """Every word of the built-in world's captions: concept names, generic words and fillers."""
    words = [name for concept in CONCEPTS for name in concept.names]
    words += [w for w in GENERIC_WORD.values() if w] + list(FILLER_WORDS)
    return list(dict.fromkeys(words))


def preserved_prompts(requests: list[ResolvedRequest], earlier: list[ResolvedRequest], concepts: list[str],
                      vocabulary: list[str], general_prompts: list[str] = (),
                      erased_before: set[str] = frozenset()) -> PreservedPrompts:
    """The prompts of each group for the request(s) being trained (`requests`: one in the sequential and
    independent settings, all of them when simultaneous), given the requests applied before them.

    `concepts`: names of concepts the model should keep knowing (on the built-in world every world
    concept; elsewhere every request's preserved concepts); those erased by `requests` or by
    `earlier` (any name) are left out of the never-erased group, and the ones erased by `earlier` go
    to `erased`, in their own request's templates. `vocabulary`: single words; those naming an
    erased concept are left out. `general_prompts`: the concept set's prompts for the erosion check,
    those naming an erased concept left out. `erased_before`: name keys of concepts an earlier run erased
    (`duge.concepts.names_keys`), left out like `earlier`'s and put in `erased` in the templates of
    `requests` (that run's own templates are not known).
    """
    gone = erased_keys([*requests, *earlier], set(erased_before))
    out = PreservedPrompts()
    for request in requests:
        for template in request.templates:
            out.templates += [render_prompt(template, request.anchor), render_prompt(template, "")]
            out.preserved += [render_prompt(template, p) for p in request.preserve if p.lower() not in gone]
            out.never_erased += [render_prompt(template, c) for c in dict.fromkeys(concepts)
                                 if c.lower() not in gone and c not in request.preserve]
    out.vocabulary = [w for w in dict.fromkeys(vocabulary) if w.lower() not in gone]
    out.vocabulary += [p for p in general_prompts if not any(word in gone for word in p.lower().split())]
    for r in earlier:
        for template in r.templates:
            out.erased += [render_prompt(template, name) for name in dict.fromkeys((r.target, *r.aliases))]
    for request in requests:
        out.erased += [render_prompt(template, name) for template in request.templates
                       for name in sorted(erased_before)]
    for name in GROUPS:  # one row per distinct prompt
        setattr(out, name, list(dict.fromkeys(getattr(out, name))))
    return out


def run_preserved_prompts(requests: list[ResolvedRequest], earlier: list[ResolvedRequest],
                          all_requests: list[ResolvedRequest], general_prompts: list[str],
                          erased_before: set[str] = frozenset()) -> PreservedPrompts:
    """`preserved_prompts` with a run's concepts and vocabulary: on the built-in world (requests resolved
    there carry the target's `kind`) every world concept and every caption word; on a user's model every
    request's preserved concepts and `GENERAL_WORDS`; the concept set's general prompts either way.
    `erased_before`: name keys of what an earlier run erased (`preserved_prompts`)."""
    if any(r.kind is not None for r in all_requests):
        concepts, vocabulary = [c.name for c in CONCEPTS], world_vocabulary()
    else:
        concepts = [p for r in all_requests for p in r.preserve]
        vocabulary = list(GENERAL_WORDS)
    return preserved_prompts(requests, earlier, concepts, vocabulary, list(general_prompts), erased_before)


def second_moment(states: torch.Tensor) -> torch.Tensor:
    """Mean of x xᵀ over every row x of `states` [..., d] (all positions of all prompts): [d, d], float64."""
    x = states.reshape(-1, states.shape[-1]).to(torch.float64)
    return x.T @ x / max(1, x.shape[0])


def preservation_second_moment(encode, prompts: PreservedPrompts, batch_size: int = 64) -> torch.Tensor:
    """C [d, d] (float64, on the CPU) of the text states of `prompts` (module doc): each non-empty group's
    mean second moment, averaged over the groups, scaled to trace d.

    `encode(list[str])` returns the text conditioning [B, tokens, d] (a backend's `encode_prompts`).
    """
    moments = []
    for texts in prompts.groups().values():
        if texts:
            states = torch.cat([text_hidden_states(encode(texts[i : i + batch_size])).detach().float().cpu()
                                for i in range(0, len(texts), batch_size)])  # [N, tokens, d]
            moments.append(second_moment(states))
    if not moments:
        raise ValueError("preservation: no prompt to preserve (every group is empty)")
    c = torch.stack(moments).mean(0)
    return c * (c.shape[0] / torch.trace(c).clamp(min=1e-30))


def is_text_projection(name: str) -> bool:
    """A cross-attention key or value projection (its input is the text states), in either UNet layout."""
    return name.split(".")[-1] in ("to_k", "to_v") and ".attn2." in f".{name}"


def layer_moments(in_features: dict[str, int], moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """`moment` for every layer (name → its input width) that is a text K/V projection of the moment's
    width; other layers (a query or output projection reads image features) get none."""
    width = moment.shape[0]
    return {name: moment for name, n in in_features.items() if is_text_projection(name) and n == width}


def preservation_penalty(delta: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """tr(ΔW C ΔWᵀ) for ΔW [out, in] and C [in, in]: the mean squared change of the protected outputs
    (times the trace scale). Differentiable in ΔW."""
    c = moment.to(device=delta.device, dtype=delta.dtype)
    return ((delta @ c) * delta).sum()


def preservation_penalty_grad(delta: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """∂ tr(ΔW C ΔWᵀ) / ∂ΔW = 2 ΔW C (C symmetric), in closed form: no backward pass."""
    return 2.0 * delta @ moment.to(device=delta.device, dtype=delta.dtype)


def null_space_projector(moment: torch.Tensor, mu: float) -> torch.Tensor:
    """P = I − C (C + μI)⁻¹ = μ (C + μI)⁻¹ [in, in] (float64): an update ΔW P keeps the share μ/(λ+μ) of
    its component along an eigenvector of C with eigenvalue λ.

    μ > 0 is relative to C's mean eigenvalue, which is 1 for the C of `preservation_second_moment`.
    μ = 0: the hard projector onto C's null space (eigenvalues at most d · eps · λ_max, numerical rank),
    as AlphaEdit's P = U₀U₀ᵀ.
    """
    if mu < 0:
        raise ValueError(f"null_space_projector: μ must be 0 (hard) or positive, got {mu}")
    c = moment.to(torch.float64)
    c = (c + c.T) / 2
    eigenvalues, vectors = torch.linalg.eigh(c)  # ascending
    eigenvalues = eigenvalues.clamp(min=0)
    if mu == 0:
        tolerance = c.shape[0] * torch.finfo(torch.float64).eps * float(eigenvalues.max().clamp(min=1e-300))
        keep = (eigenvalues <= tolerance).to(torch.float64)
    else:
        keep = mu / (eigenvalues + mu)
    return (vectors * keep) @ vectors.T


def project_update(update: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """ΔW P for an update ΔW [out, in] and a projector P [in, in], in the update's dtype and device."""
    return update @ projector.to(device=update.device, dtype=update.dtype)


def preservation_moments(backend: Backend, edits: LayerEdits, requests: list[ResolvedRequest],
                         earlier: list[ResolvedRequest], all_requests: list[ResolvedRequest],
                         general_prompts: list[str], kind: str,
                         erased_before: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Layer name → C for the penalty and projection regularisers (`run_preserved_prompts` of the request(s)
    being trained, `erased_before` the name keys an earlier run erased); {} for the other regularisers."""
    if kind not in ("penalty", "projection"):
        return {}
    prompts = run_preserved_prompts(requests, earlier, all_requests, general_prompts, erased_before)
    moment = preservation_second_moment(backend.encode_prompts, prompts)
    return layer_moments({name: d.committed.shape[1] for name, d in edits.deltas.items()}, moment)


def projected_parameters(edits: LayerEdits, moments: dict[str, torch.Tensor],
                         mu: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(trainable tensor whose rows live in a layer's input space, that layer's null-space projector) for the
    projection regulariser: a full delta ΔW [out, in], or a LoRA's `down` [rank, in] (projected once here,
    so that ΔW = up·down starts and stays in the soft null space)."""
    out = []
    for name, moment in moments.items():
        d = edits.deltas[name]
        projector = null_space_projector(moment, mu).float()
        param = d.delta if d.mode == "full" else d.down
        projector = projector.to(param.device)
        if d.mode == "lora":
            with torch.no_grad():
                param.copy_(project_update(param, projector))
        out.append((param, projector))
    return out


@contextmanager
def projected_updates(projected: list[tuple[torch.Tensor, torch.Tensor]]):
    """Around an optimiser step: afterwards each tensor of `projected` (`projected_parameters`) has moved by
    its update times its projector only, i.e. onto the soft null space of the preserved inputs."""
    before = [param.detach().clone() for param, _ in projected]
    yield
    with torch.no_grad():
        for (param, projector), previous in zip(projected, before):
            param.copy_(previous + project_update(param - previous, projector))

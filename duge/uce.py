"""Unified Concept Editing (Gandikota et al., WACV 2024) as a baseline: a closed-form edit of the
cross-attention key/value projections, no training.

For each projection W [out, in] that reads the text embedding (`attn2.to_k`, `attn2.to_v`), with
c_i the embeddings of the erased concepts, v*_i = W·a_i the layer's output for the embedding a_i
of what c_i should become, and c_j the embeddings whose outputs must not move,

    W_new = (λ·W + s_e·Σ_i v*_i c_iᵀ + s_p·Σ_j W c_j c_jᵀ) · (λ·I + s_e·Σ_i c_i c_iᵀ + s_p·Σ_j c_j c_jᵀ)⁻¹

the minimiser of  s_e·Σ‖W' c_i − v*_i‖² + s_p·Σ‖W' c_j − W c_j‖² + λ‖W' − W‖²_F  (equation 7 of
the paper). The λ term keeps every direction no embedding names where it was.

Which embeddings, as the authors' `train-scripts/train_erase.py` (`edit_model`) takes them, per
request and per template T of the request:
- c_i: the token positions of T(name) from the target's last token THROUGH the end-of-text and
  padding positions, for the target and each alias. In a causal text encoder every position after
  the target carries it; editing the last token alone leaves the end-of-text and padding
  embeddings, which the UNet also attends to, drawing the target.
- a_i: the same positions of T(anchor), aligned from the anchor's last token (for the empty anchor,
  the token before the slot: BOS when the slot opens the template); both ranges are cut to the
  shorter, as train_erase.py cuts them (`farthest`).
- c_j: every position of T(p) for each concept p to preserve (train_erase.py's retain texts are
  kept whole), and of T(anchor), so that the template and the anchor keep their meaning.

`uce_delta` solves against the current weights (`uce`: each request edits the model the earlier
requests left, with its own sets only; in the simultaneous setting every request at once, as the
paper's `edit_model` takes lists of concepts) or against θ0 with every request so far (`uce-resolve`);
`commit_uce_request` solves and commits one request for the trainer. Which concepts may be
preserved at request k comes from `duge.concepts.preserved_at`. Solved in float64 on the CPU.
"""

from __future__ import annotations

import torch

from .backends.base import Backend
from .concepts import ResolvedRequest, render_prompt
from .conditioning import text_hidden_states
from .config import UnlearnConfig
from .edits import LayerEdits
from .preservation import is_text_projection

# train_erase.py: edit_model(..., lamb=0.5, erase_scale=1, preserve_scale=0.1 (the --preserve_scale default))
DEFAULT_LAMBDA = 0.5
DEFAULT_ERASE_SCALE = 1.0
DEFAULT_PRESERVE_SCALE = 0.1


def uce_closed_form(weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
                    lamb: float = DEFAULT_LAMBDA, erase_scale: float = DEFAULT_ERASE_SCALE,
                    preserve_scale: float = DEFAULT_PRESERVE_SCALE) -> torch.Tensor:
    """UCE's edited weight for one projection, in float64.

    weight [out, in]; erase [N, in] embeddings c_i; guide [N, in] embeddings a_i whose outputs W·a_i
    the c_i must produce; preserve [M, in] embeddings c_j whose outputs stay W·c_j (M may be 0).
    Returns W_new [out, in] (float64).
    """
    w = weight.detach().to(torch.float64)
    c = erase.detach().to(w)
    a = guide.detach().to(w)
    p = preserve.detach().to(w).reshape(-1, w.shape[1])
    if c.shape != a.shape:
        raise ValueError(f"uce_closed_form: {c.shape[0]} erase embeddings but {a.shape[0]} guide embeddings")
    if lamb <= 0 and c.shape[0] + p.shape[0] < w.shape[1]:
        raise ValueError("uce_closed_form: λ must be positive when fewer embeddings than input dimensions are given")
    v_star = a @ w.T  # [N, out]
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    lhs = lamb * w + erase_scale * v_star.T @ c + preserve_scale * (w @ p.T) @ p  # [out, in]
    gram = lamb * eye + erase_scale * c.T @ c + preserve_scale * p.T @ p  # [in, in], symmetric
    # W_new · gram = lhs  <=>  gram · W_newᵀ = lhsᵀ (gram is symmetric)
    return torch.linalg.solve(gram, lhs.T).T


def _token_count(backend: Backend, text: str) -> int:
    """How many tokens `text` has (without BOS/EOS): the positions of the text in its own tokens."""
    if not text.strip():
        return 0
    _, mask = backend.token_indices([text], [text])
    return int(mask[0].sum())


def slot_last_token(backend: Backend, template: str, word: str) -> int:
    """Position (BOS = 0) of the last token of `word` in render_prompt(template, word); for an empty
    word, of the last token before the slot (0, BOS, when the slot opens the template)."""
    prefix = render_prompt(template.split("{}", 1)[0] + "{}", "")
    before = _token_count(backend, prefix)  # the slot starts at position before + 1
    position = before + _token_count(backend, word)
    if word.strip():
        idx, mask = backend.token_indices([render_prompt(template, word)], [word])
        if position not in {int(i) for i, m in zip(idx[0].tolist(), mask[0].tolist()) if m}:
            raise ValueError(f"uce: {word!r} is not at position {position} of the tokens of "
                             f"{render_prompt(template, word)!r}")
    return position


def uce_embeddings(backend: Backend, requests: list[ResolvedRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(erase [N, dim], guide [N, dim], preserve [M, dim]) text embeddings, float32 on the CPU (module doc).

    Each request's `preserve` is used as given: the caller passes the lists `preserved_at` allows.
    """
    erase, guide, preserve = [], [], []
    for request in requests:
        names = list(dict.fromkeys([request.target, *request.aliases]))
        for template in request.templates:
            anchor_ctx = text_hidden_states(backend.encode_prompts([render_prompt(template, request.anchor)]))
            anchor_ctx = anchor_ctx[0].float().cpu()  # [tokens, dim]
            length = anchor_ctx.shape[0]
            anchor_pos = slot_last_token(backend, template, request.anchor)
            ctx = text_hidden_states(backend.encode_prompts([render_prompt(template, n) for n in names])).float().cpu()
            for k, name in enumerate(names):
                pos = slot_last_token(backend, template, name)
                span = length - max(pos, anchor_pos)  # train_erase.py: both ranges cut to the shorter
                erase.extend(ctx[k, pos : pos + span])
                guide.extend(anchor_ctx[anchor_pos : anchor_pos + span])
            preserve.extend(anchor_ctx)
            if request.preserve:
                kept = text_hidden_states(backend.encode_prompts([render_prompt(template, p) for p in request.preserve]))
                preserve.extend(kept.float().cpu().reshape(-1, kept.shape[-1]))
    if not erase:
        targets = ", ".join(repr(r.target) for r in requests)
        raise ValueError(f"uce: none of the targets {targets} was found in its prompts' tokens")
    dim = erase[0].shape[0]
    stack = lambda rows: torch.stack(rows) if rows else torch.zeros(0, dim)  # noqa: E731
    return stack(erase), stack(guide), stack(preserve)


def uce_delta(backend: Backend, edits: LayerEdits, requests: list[ResolvedRequest], config: UnlearnConfig,
              from_original: bool = False) -> dict[str, torch.Tensor]:
    """The edit of every edited layer for `requests` at once (float32, on the layer's device).

    `from_original=False`: ΔW = W_new − W against the current weights W (θ0 plus the committed deltas),
    the sequential `uce`. `from_original=True`: W_new solved from θ0 and returned as W_new − θ0, the
    whole committed delta (`uce-resolve`). Edits only layers named `…attn2.to_k`/`…attn2.to_v` whose
    input is the text embedding; any other edited layer gets a zero delta (from θ0: its committed
    delta is kept). λ and the scales are the config's `uce_lambda`, `uce_erase_scale`, `uce_preserve_scale`.
    """
    lamb, erase_scale, preserve_scale = config.uce_lambda, config.uce_erase_scale, config.uce_preserve_scale
    with torch.no_grad():
        erase, guide, preserve = uce_embeddings(backend, requests)
        deltas = {}
        for name, delta in edits.deltas.items():
            original = edits.originals[name].detach().float()
            current = original if from_original else original + delta.committed.detach().float()
            if not is_text_projection(name) or current.shape[1] != erase.shape[1]:
                deltas[name] = delta.committed.detach().clone() if from_original else torch.zeros_like(delta.committed)
                continue
            w = current.cpu().to(torch.float64)
            w_new = uce_closed_form(w, erase, guide, preserve, lamb, erase_scale, preserve_scale)
            deltas[name] = (w_new - w).float().to(delta.committed.device)
    return deltas


def commit_uce_request(backend: Backend, edits: LayerEdits, requests: list[ResolvedRequest], config: UnlearnConfig,
                       from_original: bool) -> dict[str, torch.Tensor]:
    """Solve and commit the last of `requests`: with its own erase and preserve sets against the current
    weights (`uce`), or, `from_original`, every request of `requests` again from θ0 (`uce-resolve`).
    In the simultaneous setting `requests` are one edit: `uce` solves all of them together, once, against
    the weights the run starts from (θ0 unless it continues from earlier deltas), with the preserve lists
    the continual rule leaves when every one is erased; that is the problem `uce-resolve` solves after
    the last request. Returns the request's ΔW per layer (the change of the committed deltas)."""
    before = edits.committed()
    if from_original:
        total = uce_delta(backend, edits, requests, config, from_original=True)
        edits.load_committed({name: total[name].to(before[name]) for name in before})
        return {name: total[name].to(before[name]) - before[name] for name in before}
    delta = uce_delta(backend, edits, requests if config.setting == "simultaneous" else requests[-1:], config)
    edits.load_committed({name: before[name] + delta[name].to(before[name]) for name in before})
    return delta

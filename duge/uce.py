"""Unified Concept Editing (Gandikota et al., WACV 2024) as a baseline: a closed-form edit of the
cross-attention key/value projections, no training.

For each projection W [out, in] that reads the text embedding (`attn2.to_k`, `attn2.to_v`), with
c_i the embeddings of the erased concepts, v*_i = W·a_i the current layer's output for the
embedding a_i of what c_i should become, and c_j the embeddings whose outputs must not move,

    W_new = (λ·W + s_e·Σ_i v*_i c_iᵀ + s_p·Σ_j W c_j c_jᵀ) · (λ·I + s_e·Σ_i c_i c_iᵀ + s_p·Σ_j c_j c_jᵀ)⁻¹

the minimiser of  s_e·Σ‖W' c_i − v*_i‖² + s_p·Σ‖W' c_j − W c_j‖² + λ‖W' − W‖²_F  (equation 7 of
the paper; `trainscripts/uce_sd_erase.py` of the authors' repository uses the same form with
λ = 0.5, s_e = s_p = 1, the defaults here). The λ term keeps every direction no embedding names
where it was; without it W_new would send those directions to zero.

What the embeddings are here, per request and per template T of the request:
- c_i: the last token of the target (and of each alias) in T(target) — a phrase's last token
  carries the phrase in CLIP's causal text encoder, which is why UCE edits that one.
- a_i: the last token of the anchor in T(anchor), in the same template; for the empty anchor,
  the first end-of-text token of T("") (the sentence-summary token).
- c_j: the last token of each concept to preserve in T(preserved), and the "general words":
  every token of T(anchor) up to its first end-of-text token (start token, template words and
  the anchor itself), so that the template and the anchor keep their meaning.

W is the model as it is now (θ0 plus the committed deltas of earlier requests), so sequential
requests compose as UCE's own sequential runs do. Solved in float64 on the CPU.
"""

from __future__ import annotations

import torch

from .conditioning import text_hidden_states
from .concepts import ResolvedRequest, render_prompt

DEFAULT_LAMBDA = 0.5
DEFAULT_ERASE_SCALE = 1.0
DEFAULT_PRESERVE_SCALE = 1.0


def uce_closed_form(weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
                    lamb: float = DEFAULT_LAMBDA, erase_scale: float = DEFAULT_ERASE_SCALE,
                    preserve_scale: float = DEFAULT_PRESERVE_SCALE) -> torch.Tensor:
    """UCE's edited weight for one projection, in float64.

    weight [out, in]; erase [N, in] embeddings c_i; guide [N, in] embeddings a_i whose current
    outputs W·a_i the c_i must produce; preserve [M, in] embeddings c_j whose outputs stay W·c_j
    (M may be 0). Returns W_new [out, in] (float64).
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


def _last_token_rows(indices: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Per prompt, the last position of each occurrence of the phrase (positions not followed by another)."""
    rows = []
    for idx, m in zip(indices.tolist(), mask.tolist()):
        positions = [i for i, keep in zip(idx, m) if keep]
        found = set(positions)
        rows.append([i for i in positions if i + 1 not in found])
    return rows


def _eos_position(backend, prompt: str) -> int:
    _, pos = _phrase_positions(backend, [prompt], [""], eos_fallback=True)
    return pos[0][0]


def _phrase_positions(backend, prompts: list[str], words: list[str], eos_fallback: bool = False):
    indices, mask = backend.token_indices(prompts, words, eos_fallback=eos_fallback)
    return indices, _last_token_rows(indices.cpu(), mask.cpu())


def uce_embeddings(backend, requests: list[ResolvedRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(erase [N, dim], guide [N, dim], preserve [M, dim]) text embeddings, float32 on the CPU (see module doc)."""
    erase, guide, preserve = [], [], []
    for request in requests:
        names = list(dict.fromkeys([request.target, *request.aliases]))
        for template in request.templates:
            anchor_prompt = render_prompt(template, request.anchor)
            anchor_ctx = text_hidden_states(backend.encode_prompts([anchor_prompt]))[0].float().cpu()  # [tokens, dim]
            _, anchor_rows = _phrase_positions(backend, [anchor_prompt], [request.anchor], eos_fallback=True)
            anchor_vector = anchor_ctx[anchor_rows[0][-1]]
            prompts = [render_prompt(template, name) for name in names]
            ctx = text_hidden_states(backend.encode_prompts(prompts)).float().cpu()
            _, rows = _phrase_positions(backend, prompts, names)
            for k, positions in enumerate(rows):
                for pos in positions:
                    erase.append(ctx[k, pos])
                    guide.append(anchor_vector)
            # general words: the anchor prompt itself, start token to first end-of-text token
            preserve.extend(anchor_ctx[: _eos_position(backend, anchor_prompt) + 1])
            if request.preserve:
                kept_prompts = [render_prompt(template, p) for p in request.preserve]
                kept_ctx = text_hidden_states(backend.encode_prompts(kept_prompts)).float().cpu()
                _, kept_rows = _phrase_positions(backend, kept_prompts, list(request.preserve))
                for k, positions in enumerate(kept_rows):
                    preserve.extend(kept_ctx[k, pos] for pos in positions)
    if not erase:
        targets = ", ".join(repr(r.target) for r in requests)
        raise ValueError(f"uce: none of the targets {targets} was found in its prompts' tokens")
    dim = erase[0].shape[0]
    stack = lambda rows: torch.stack(rows) if rows else torch.zeros(0, dim)  # noqa: E731
    return stack(erase), stack(guide), stack(preserve)


def uce_delta(backend, edits, requests: list[ResolvedRequest], config) -> dict[str, torch.Tensor]:
    """ΔW = W_new − W per edited layer (float32, on the layer's device), for `requests` at once.

    Edits only layers named `…attn2.to_k`/`…attn2.to_v` whose input is the text embedding; any
    other edited layer gets a zero delta. λ and the scales are the config's `uce_lambda`,
    `uce_erase_scale` and `uce_preserve_scale` (UnlearnConfig: 0.5, 1, 1 as in the authors' script).
    """
    lamb, erase_scale, preserve_scale = config.uce_lambda, config.uce_erase_scale, config.uce_preserve_scale
    with torch.no_grad():
        erase, guide, preserve = uce_embeddings(backend, requests)
        deltas = {}
        for name, delta in edits.deltas.items():
            current = edits.originals[name].detach().float() + delta.committed.detach().float()
            is_text_projection = name.split(".")[-1] in ("to_k", "to_v") and ".attn2." in f".{name}"
            if not is_text_projection or current.shape[1] != erase.shape[1]:
                deltas[name] = torch.zeros_like(delta.committed)
                continue
            w = current.cpu().to(torch.float64)
            w_new = uce_closed_form(w, erase, guide, preserve, lamb, erase_scale, preserve_scale)
            deltas[name] = (w_new - w).float().to(delta.committed.device)
    return deltas

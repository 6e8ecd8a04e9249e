"""Output-space erasure: the directions of a K/V projection's output that carry a request's target,
removed for every input (`output_erasure_rank`; issue 16, docs/method.md "Output-space erasure").

A trained (or closed-form) K/V edit maps the target's text states to the anchor's outputs, but the
projection still reaches every output direction it reached before: another input — an inverted
token's states, say — can produce the target's outputs again, and concept inversion finds one. A
projection with fewer output directions cannot: what it does not reach, no prompt brings back.

For each edited projection W [out, in] that reads the text states (the model as the earlier requests
left it, before this request trains), with (c_i, a_i) the target's and the anchor's aligned text
states (`duge.uce.uce_embeddings`: from the target's last token through end-of-text and padding,
for every template and name) and C the second moment of the states that must stay
(`duge.preservation`: templates, preserved and never-erased concepts, vocabulary, earlier targets):

    A = W · mean_i (c_i − a_i)(c_i − a_i)ᵀ · Wᵀ / tr(·)      the target-minus-anchor output energy
    B = W · C · Wᵀ / tr(·)                                    the protected outputs' energy
    Q_k = the `rank` directions u with the largest uᵀAu / uᵀ(B + ε·I/out)u  (ε = `output_erasure_epsilon`),

the generalised eigenvectors of (A, B + ε·I/out), orthonormalised: where the target differs from its
anchor most and the outputs that must stay have least energy. (Taking instead the top eigenvectors of
A − κ·B removed, for "heart", 65 % of the output energy of the kept "star" at κ = 1, and eroded
method_tuning10 to IRA 0.78 after ten requests: docs/method.md.)

and after the request has trained, the layer's weight becomes (I − Q Qᵀ)·W_k with Q an orthonormal
basis of every request's directions so far (Q_1 … Q_k): an earlier request's directions stay removed
whatever a later request trains. The request's ΔW is the change of the committed delta, projection
included, so a saved request, a LoRA export and a resumed run see the same weights.

The directions are recomputed from the committed deltas when a run resumes (`directions_so_far`).
Costs one text-encoder pass over the request's templates and an eigendecomposition [out, out] per
layer: no UNet pass.
"""

from __future__ import annotations

import torch

from .backends.base import Backend
from .concepts import ResolvedRequest
from .edits import LayerEdits
from .preservation import is_text_projection, preservation_second_moment, run_preserved_prompts
from .uce import uce_embeddings

Directions = dict[str, torch.Tensor]  # layer name → [out, rank] float64 on the CPU


def output_directions(weight: torch.Tensor, difference_moment: torch.Tensor, protected_moment: torch.Tensor,
                      rank: int, epsilon: float) -> torch.Tensor:
    """[out, rank] (float64, orthonormal): the top generalised eigenvectors of (A, B + ε·I/out) for one projection
    `weight` [out, in] (module doc), `difference_moment` and `protected_moment` [in, in] the input-space second
    moments of c − a and of C."""
    w = weight.detach().to(torch.float64).cpu()
    a = w @ difference_moment @ w.T
    b = w @ protected_moment @ w.T
    a, b = a / a.trace().clamp_min(1e-30), b / b.trace().clamp_min(1e-30)
    b = b + epsilon / len(b) * torch.eye(len(b), dtype=b.dtype)
    inverse_factor = torch.linalg.inv(torch.linalg.cholesky(b))  # L⁻¹ with B + εI = L Lᵀ
    _, vectors = torch.linalg.eigh(inverse_factor @ a @ inverse_factor.T)  # ascending eigenvalues
    directions = inverse_factor.T @ vectors[:, -rank:].flip(1)
    basis, _ = torch.linalg.qr(directions)
    return basis.contiguous()


def request_directions(backend: Backend, edits: LayerEdits, requests: list[ResolvedRequest],
                       earlier: list[ResolvedRequest], all_requests: list[ResolvedRequest], general_prompts: list[str],
                       rank: int, epsilon: float, erased_before: set[str] = frozenset(),
                       protected_moment: torch.Tensor | None = None) -> Directions:
    """Q of `requests` (one request, or every one when simultaneous) for each edited text projection, from the
    current weights (θ0 plus the committed deltas, i.e. the model before these requests train).
    `protected_moment`: C of these requests when the caller has it (`duge.preservation.preservation_moments`
    built it for the penalty); else it is built here from the same prompts."""
    with torch.no_grad():
        erase, guide, _ = uce_embeddings(backend, requests)
        difference = (erase - guide).to(torch.float64)
        difference_moment = difference.T @ difference / len(difference)
        if protected_moment is None:
            protected = run_preserved_prompts(requests, earlier, all_requests, general_prompts, erased_before)
            protected_moment = preservation_second_moment(backend.encode_prompts, protected)
        protected_moment = protected_moment.to(device="cpu", dtype=torch.float64)
        directions = {}
        for name, delta in edits.deltas.items():
            weight = edits.originals[name].detach().float() + delta.committed.detach().float()
            if is_text_projection(name) and weight.shape[1] == difference_moment.shape[0]:
                directions[name] = output_directions(weight, difference_moment, protected_moment, rank, epsilon)
    return directions


def remove_directions(edits: LayerEdits, directions: list[Directions], before: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Project every edited layer's weight onto the complement of all `directions` (each request's Q), commit it,
    and return the change of the committed deltas since `before` (the request's ΔW, projection included)."""
    with torch.no_grad():
        committed = edits.committed()
        for name in committed:
            parts = [d[name] for d in directions if name in d]
            if not parts:
                continue
            basis, _ = torch.linalg.qr(torch.cat(parts, dim=1))  # orthonormal [out, Σ rank]
            weight = edits.originals[name].detach().to(torch.float64).cpu() + committed[name].to(torch.float64).cpu()
            projected = weight - basis @ (basis.T @ weight)
            committed[name] = (projected - edits.originals[name].detach().to(torch.float64).cpu()).to(committed[name])
        edits.load_committed(committed)
    return {name: committed[name] - before[name] for name in committed}


def directions_so_far(backend: Backend, edits: LayerEdits, requests: list[ResolvedRequest],
                      deltas: list[dict[str, torch.Tensor]], general_prompts: list[str], rank: int, epsilon: float,
                      erased_before: set[str] = frozenset()) -> list[Directions]:
    """Q of each finished request of a resumed sequential run (`deltas`: their ΔW, in order), computed as the
    run computed them: request j's from the weights before it trained (the committed deltas less Δ_j … Δ_last).
    The committed deltas are restored afterwards."""
    final = edits.committed()
    start = {name: final[name] - sum((d[name].to(final[name]) for d in deltas), torch.zeros_like(final[name]))
             for name in final}
    found = []
    try:
        for j in range(len(deltas)):
            edits.load_committed({name: start[name] + sum((d[name].to(start[name]) for d in deltas[:j]),
                                                          torch.zeros_like(start[name])) for name in start})
            found.append(request_directions(backend, edits, [requests[j]], requests[:j], requests, general_prompts,
                                            rank, epsilon, erased_before))
    finally:
        edits.load_committed(final)
    return found

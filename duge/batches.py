"""A step's samples, drawn from the requests' cached images (`duge.image_cache.RequestCache`).

The whole batch is drawn at once, from generators every process seeds alike, so it is the same in
every process of a data-parallel run and for any micro-batching; `duge.harness.accumulate` then
runs this process's rows of it a micro-batch at a time.

Adversarial training (`duge.adversarial`) then puts its attacks into every other row of the current
request for the trainable pass only (`duge.adversarial.with_attacks`): a text prefix (`trained_prompts`,
`with_attack_prompts`), or the target word replaced by a learnt token embedding (`learnt_tokens`, put into
the pass by `learnt_conditioning`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends.base import Backend
from .concepts import render_prompt
from .config import UnlearnConfig
from .image_cache import RequestCache
from .methods import Method


@dataclass
class LearntTokenRow:
    """The trainable pass's conditioning of a row whose target word is replaced by a learnt token embedding
    (adversarial training against the concept inversion, `duge.adversarial`)."""

    context: torch.Tensor  # [tokens, dim]: duge.attacks.inverted_context of the row's prompt with the placeholder
    word_positions: list[int]  # the target word's token positions in it (the placeholder's, and any later mention)


@dataclass
class Batch:
    """One step's samples. Row i of the anchor part: noised latent zt[i] at timestep t[i], prompts and words."""

    zt: torch.Tensor  # [b, C, h, w]
    t: torch.Tensor  # [b]
    target_prompts: list[str]
    anchor_prompts: list[str]
    target_words: list[str]
    tok_anchor: torch.Tensor  # [b, T] token indices of the anchor word
    mask_anchor: torch.Tensor  # [b, T] bool
    has_anchor: torch.Tensor  # [b] bool: the anchor has tokens (the attention term needs them)
    related_zt: torch.Tensor | None = None  # [r, C, h, w]
    related_t: torch.Tensor | None = None  # [r]
    related_prompts: list[str] = field(default_factory=list)
    # What the trainable pass reads instead of target_prompts, where it differs (attack prompts, duge.adversarial);
    # the frozen teachers always read target_prompts.
    trained_prompts: list[str] | None = None
    # Rows whose trainable pass is conditioned on a learnt token instead (attack embeddings; None: the prompt's).
    learnt_tokens: list[LearntTokenRow | None] | None = None

    def __getitem__(self, rows: slice) -> "Batch":
        """The anchor part's rows `rows` (without the related rows)."""
        return Batch(self.zt[rows], self.t[rows], self.target_prompts[rows], self.anchor_prompts[rows],
                     self.target_words[rows], self.tok_anchor[rows], self.mask_anchor[rows], self.has_anchor[rows],
                     trained_prompts=self.trained_prompts[rows] if self.trained_prompts is not None else None,
                     learnt_tokens=self.learnt_tokens[rows] if self.learnt_tokens is not None else None)


def replay_requests(earlier: int, rows: int, step: int) -> list[int]:
    """Which earlier request (0..earlier−1) each of step `step`'s `rows` replayed rows comes from: a cycle, so
    that over any `earlier` consecutive steps every earlier request gets exactly `rows` rows, however many
    requests came before (drawing them at random gave the oldest ones fewer rows at times, and no more in
    expectation)."""
    if earlier <= 0 or rows <= 0:
        return []
    return [(step * rows + i) % earlier for i in range(rows)]


def draw_batch(backend: Backend, caches: list[RequestCache], method: Method, config: UnlearnConfig,
               rng: np.random.Generator, generator: torch.Generator, replay: int = 0, step: int = 0) -> Batch:
    """The samples of step `step`.

    `replay` > 0: the last cache is the current request, which fills `batch_size` samples, and
    `replay` samples come from the earlier caches, one cache per row as `replay_requests` cycles
    through them (replayed erasures). Otherwise the
    `batch_size` samples are drawn from all caches alike (one cache, or all when simultaneous).
    A row's image is one of its request's anchor images, or of its target images for an objective
    that trains on those (esd-x).
    """
    device = backend.device
    if replay > 0 and len(caches) > 1:
        which = np.concatenate([np.full(config.batch_size, len(caches) - 1),
                                replay_requests(len(caches) - 1, replay, step)]).astype(int)
    else:
        which = rng.integers(0, len(caches), config.batch_size)
    anchor_z, target_prompts, anchor_prompts, target_words, anchor_words = [], [], [], [], []
    related_z, related_prompts = [], []
    for c in which:
        cache = caches[c]
        req = cache.request
        i = rng.integers(0, len(cache.anchor_latents))
        template = req.templates[cache.anchor_templates[i]]
        word = ([req.target] + list(req.aliases))[rng.integers(0, 1 + len(req.aliases))]
        if method.objective == "negative_guidance":  # images of the target itself
            i = rng.integers(0, len(cache.target_latents))
            template = req.templates[i % len(req.templates)]
            anchor_z.append(cache.target_latents[i])
        else:
            anchor_z.append(cache.anchor_latents[i])
        target_prompts.append(render_prompt(template, word))
        anchor_prompts.append(render_prompt(template, req.anchor))
        target_words.append(word)
        anchor_words.append(req.anchor)
        if len(cache.related_latents):
            j = rng.integers(0, len(cache.related_latents))
            related_z.append(cache.related_latents[j])
            related_prompts.append(cache.related_prompts[j])

    z0 = torch.stack(anchor_z).to(device)
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t = torch.randint(0, backend.num_train_timesteps, (len(which),), generator=generator).to(device)
    tok_anchor, mask_anchor = backend.token_indices(anchor_prompts, anchor_words)
    batch = Batch(backend.add_noise(z0, noise, t), t, target_prompts, anchor_prompts, target_words,
                  tok_anchor, mask_anchor, mask_anchor.any(1))
    if related_z and method.prior_term and config.lambda_prior > 0:
        if config.related_batch_size is not None:  # unset: one related row per anchor and replayed row
            related_z, related_prompts = related_z[: config.related_batch_size], related_prompts[: config.related_batch_size]
        zr0 = torch.stack(related_z).to(device)
        noise_r = torch.randn(zr0.shape, generator=generator).to(device)
        t_r = torch.randint(0, backend.num_train_timesteps, (len(related_z),), generator=generator).to(device)
        batch.related_zt, batch.related_t = backend.add_noise(zr0, noise_r, t_r), t_r
        batch.related_prompts = related_prompts
    return batch


def with_attack_prompts(rows: Batch, prefixes: list[str], current_rows: int, step: int) -> Batch:
    """`rows` with `trained_prompts` set: of the first `current_rows` rows (the current request's), row i of
    step `step` is trained on `prefixes[j] + " " + its target prompt` when step·current_rows + i is odd, j
    taking the prefixes in turn; every other row keeps its plain prompt. No prefixes: `rows` unchanged."""
    if not prefixes:
        return rows
    trained = list(rows.target_prompts)
    for i, turn in attacked_rows(current_rows, len(trained), step):
        trained[i] = f"{prefixes[turn % len(prefixes)]} {trained[i]}"
    return dataclasses.replace(rows, trained_prompts=trained)


def attacked_rows(current_rows: int, rows: int, step: int) -> list[tuple[int, int]]:
    """(row i, turn j) of each row of step `step` an attack goes into: of the first `current_rows` rows (the
    current request's), those with step·current_rows + i odd; the j-th such row of the request takes the
    attacks in turn."""
    return [(i, (step * current_rows + i) // 2) for i in range(min(current_rows, rows))
            if (step * current_rows + i) % 2 == 1]


def learnt_conditioning(context: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                        learnt: list[LearntTokenRow | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainable pass's context [B, tokens, dim] and target-word token indices and mask [B, K] with the
    first len(learnt) rows' learnt tokens put in where set (`Batch.learnt_tokens`)."""
    if not any(row is not None for row in learnt):
        return context, tokens, mask
    width = max([tokens.shape[1]] + [len(row.word_positions) for row in learnt if row is not None])
    pad = width - tokens.shape[1]  # columns index 0, masked out
    tokens = torch.cat([tokens, tokens.new_zeros(len(tokens), pad)], 1)
    mask = torch.cat([mask, mask.new_zeros(len(mask), pad)], 1)
    contexts = list(context.unbind(0))
    for i, row in enumerate(learnt):
        if row is None:
            continue
        contexts[i] = row.context.to(context.device, context.dtype)
        tokens[i], mask[i] = 0, False
        tokens[i, : len(row.word_positions)] = torch.tensor(row.word_positions, dtype=tokens.dtype, device=tokens.device)
        mask[i, : len(row.word_positions)] = True
    return torch.stack(contexts), tokens, mask

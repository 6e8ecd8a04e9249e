"""Adversarial training (`UnlearnConfig.adversarial_every`, `duge unlearn --adversarial N`), as AdvUnlearn and
Receler do it: the trainer attacks its own edit at intervals and trains the erasure on what the attack found.

Every `adversarial_every` steps of a request (from that step on), `AdversarialSearch.search` runs an attack of
`duge.attacks` (`adversarial_attack`: the prompt search or the concept inversion, UnlearnDiffAtk's objective)
against the model as it is now — the committed deltas and the request's trainable delta — on images of the
target that the request's reference model ε_φ drew when the request started.

The prompt search (`search_prompt`):

    prefix* = argmin over k vocabulary tokens of  L(prefix + " " + target prompt)

with L the edited model's denoising loss on those images (`duge.attacks.DenoisingObjective`), at most
`adversarial_budget` UNet passes per search, the attack tokens before the prompt (AttackConfig's tokens and
search; the searched prompt is the request's next template with the target's name). The search changes no
weight and leaves the deltas' gradients alone.

The concept inversion (`invert_concept`, as `duge attack --attack inversion` runs it): the target's name in the
searched prompt is replaced by one placeholder token whose input embedding e is learnt by Adam on L,

    e* = argmin over e of  L(prompt with the name's tokens replaced by e)

starting from AttackConfig's initializer (the vocabulary's mean embedding), within the same budget. Only e's
gradient is computed (`torch.autograd.grad`), so the deltas' `.grad` stay untouched here too.

The last `adversarial_prompts` prefixes (or embeddings) found are kept; from then on every other row of the
current request (counted over the steps) trains on its target prompt with one of them, in turn: a prefix in
front (`duge.batches.with_attack_prompts`), or the row's target word replaced by the learnt embedding
(`with_attack_embeddings`: the row's conditioning is `duge.attacks.inverted_context`'s, and its
attention term reads the placeholder token's maps as the target word's). Only the trainable pass sees the
attack: the frozen teachers' targets stay those of the row's plain prompt, so the attacked prompt is steered
to the anchor like the plain one. Prefixes enter as text (decoded and tokenized again, as a typed prompt would
be), embeddings detached. A request's attacks are not replayed by later requests, and each search is seeded
from its request's seed and step, so a resumed run finds the same ones.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .attacks import (AttackCancelled, DenoisingObjective, PassCounter, candidate_token_ids, initial_embedding,
                      invert_concept, inverted_context, nearest_tokens, placeholder_prompt,
                      replace_name_with_placeholder, search_prompt)
from .backends.base import Backend
from .batches import Batch, LearntTokenRow, attacked_rows, with_attack_prompts
from .concepts import ResolvedRequest, render_prompt
from .config import ADVERSARIAL_SEED_OFFSET, AttackConfig, UnlearnConfig
from .edits import LayerEdits
from .errors import DugeError
from .harness import UnlearnCancelled
from .image_cache import sample_with_progress
from .phases import Phases

# A search's passes keep no activations for a backward pass (but the gradient search's one), so they take this
# many rows per UNet call for each row a training step's micro-batch holds.
SEARCH_ROWS_PER_TRAINING_ROW = 4
TOKEN_CALLS = ("prompt_token_ids", "pad_token_ids", "special_token_ids", "decode_token_ids", "token_embedding_table",
               "encode_tokens")  # what either attack needs of a backend (duge.attacks.TokenBackend)


@dataclass
class AttackInputs:
    """What adversarial training (`duge.adversarial`) found against the current request's edit and trains its
    rows on: text prefixes, or learnt input embeddings of the target's name (each written into the prompt at
    the place of one `placeholder_id` token, as `duge.attacks` inverts a concept)."""

    prefixes: list[str] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)  # [dim] each, detached
    placeholder_id: int = 0


def learnt_token_row(backend: Backend, prompt: str, word: str, embedding: torch.Tensor,
                     placeholder_id: int) -> LearntTokenRow | None:
    """`prompt`'s conditioning with its first mention of `word` replaced by one token of input embedding
    `embedding` [dim] (`duge.attacks.inverted_context`, no gradient), and the positions of the word's tokens in
    it (those of `backend.token_indices` in the plain prompt, the replaced run now the placeholder's one
    position). None when the prompt's tokens do not hold the word's."""
    prompt_ids, name_ids = backend.prompt_token_ids(prompt), backend.prompt_token_ids(word)
    try:
        ids, position = replace_name_with_placeholder(prompt_ids, name_ids, placeholder_id)
    except DugeError:
        return None
    removed = len(name_ids) - 3  # the name's tokens (start and end ids aside) become one
    tokens, mask = backend.token_indices([prompt], [word])
    positions = sorted({p if p < position else max(position, p - removed) for p in tokens[0][mask[0]].tolist()})
    with torch.no_grad():
        context = inverted_context(backend, ids, position, embedding)[0]  # [tokens, dim]
    return LearntTokenRow(context.detach(), positions)


def with_attack_embeddings(backend: Backend, rows: Batch, embeddings: list[torch.Tensor], placeholder_id: int,
                           current_rows: int, step: int) -> Batch:
    """`rows` with `learnt_tokens` set for the rows `with_attack_prompts` would prefix (the same alternation):
    row i's target word replaced by `embeddings[j]` in its target prompt (`learnt_token_row`), j taking the
    embeddings in turn; every other row keeps its plain prompt. No embeddings: `rows` unchanged."""
    if not embeddings:
        return rows
    learnt: list[LearntTokenRow | None] = [None] * len(rows.target_prompts)
    for i, turn in attacked_rows(current_rows, len(learnt), step):
        learnt[i] = learnt_token_row(backend, rows.target_prompts[i], rows.target_words[i],
                                     embeddings[turn % len(embeddings)], placeholder_id)
    return dataclasses.replace(rows, learnt_tokens=learnt)


def with_attacks(backend: Backend, rows: Batch, attacks: AttackInputs | None, current_rows: int, step: int) -> Batch:
    """`rows` with the attacks found so far trained on (`with_attack_prompts`, `with_attack_embeddings`)."""
    if attacks is None:
        return rows
    rows = with_attack_prompts(rows, attacks.prefixes, current_rows, step)
    return with_attack_embeddings(backend, rows, attacks.embeddings, attacks.placeholder_id, current_rows, step)


def searches_in(steps: int, every: int) -> int:
    """How many searches a request of `steps` steps runs: at steps every, 2·every, ... below `steps`."""
    return (steps - 1) // every if every > 0 else 0


@dataclass
class AdversarialSearch:
    """One request's attack searches (module doc): the reference model's images of the target, the prefixes or
    embeddings kept, and a record of every search (`found`: step, attack, prompt, objective of the plain and
    attacked prompt, UNet passes, seconds — the request's `RequestResult.adversarial`)."""

    backend: Backend
    request: ResolvedRequest
    config: UnlearnConfig
    seed: int
    target_latents: torch.Tensor | None  # [N, C, h, w]; None when adversarial training is off
    max_rows: int  # UNet rows per call of the search's no-grad passes
    attack: AttackConfig  # the search's settings: AttackConfig's defaults, adversarial_budget, tokens before the prompt
    prefixes: list[str] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)  # [dim] each: the inversion's learnt embeddings
    placeholder_id: int = 0  # the token id the embeddings stand in for (the first candidate, as duge attack's)
    found: list[dict] = field(default_factory=list)

    @property
    def inputs(self) -> AttackInputs:
        """What the training steps put into the current request's rows (`with_attacks`)."""
        return AttackInputs(list(self.prefixes), list(self.embeddings), self.placeholder_id)

    @classmethod
    def start(cls, backend: Backend, edits: LayerEdits, request: ResolvedRequest, config: UnlearnConfig, seed: int,
              training_rows: int, phases: Phases) -> AdversarialSearch:
        """Draw the images of `request`'s target the searches aim at, with the reference model ε_φ (a phase of
        kind "images"); image i from the request's next template, seed + ADVERSARIAL_SEED_OFFSET + i.
        `training_rows`: the rows of a training step's UNet call (its micro-batch). With adversarial training
        off, a search that is never due and draws nothing."""
        attack = dataclasses.replace(AttackConfig(), budget=config.adversarial_budget, position="prefix")
        max_rows = SEARCH_ROWS_PER_TRAINING_ROW * max(1, training_rows)
        if not config.adversarial_every:
            return cls(backend, request, config, seed, None, max_rows, attack)
        missing = [name for name in TOKEN_CALLS if not hasattr(backend, name)]
        if missing:
            raise DugeError(f"adversarial_every needs a backend that gives the attacks token ids and embeddings "
                            f"({', '.join(missing)} missing): the diffusers backend of SD 1.x / 2.x models; this one is "
                            f"{type(backend).__name__}")
        backend.token_embedding_table()  # refuses, before any training, a model it cannot search (SDXL's two encoders)
        count = attack.objective_images
        prompts = [render_prompt(request.templates[i % len(request.templates)], request.target) for i in range(count)]
        seeds = [seed + ADVERSARIAL_SEED_OFFSET + i for i in range(count)]
        with phases.phase(f"images of '{request.target}' to attack", count, "image", "images", target=request.target), \
                edits.reference():
            latents = sample_with_progress(backend, prompts, seeds, config.sampler_steps, config.sampler_guidance, phases)
        return cls(backend, request, config, seed, latents.detach().cpu(), max_rows, attack)

    def due(self, step: int) -> bool:
        every = self.config.adversarial_every
        return every > 0 and step > 0 and step % every == 0

    def search(self, step: int, phases: Phases, cancel=None) -> None:
        """Search an attack prefix (or learn an embedding of the target's name) against the model as it is now;
        keep it (the last `adversarial_prompts`). Counts as one unit of the current phase, advanced by each UNet
        pass's share of the budget as it is spent."""
        t0, attack = time.perf_counter(), self.attack
        templates = self.request.templates
        prompt = render_prompt(templates[len(self.found) % len(templates)], self.request.target)
        prompt_ids = self.backend.prompt_token_ids(prompt)
        search_seed = int(np.random.SeedSequence([self.seed + ADVERSARIAL_SEED_OFFSET, step]).generate_state(1)[0])
        counter = PassCounter(attack.budget, on_spend=lambda passes: phases.advance(passes / attack.budget))
        generator = torch.Generator().manual_seed(search_seed)  # the fixed draws, then the inversion's steps
        objective = DenoisingObjective(self.backend, self.target_latents, attack.objective_timesteps, generator,
                                       counter, self.max_rows)
        try:
            with torch.no_grad():
                plain = float(objective.losses(self.backend.encode_tokens(self.backend.pad_token_ids([prompt_ids])))[0])
            if self.config.adversarial_attack == "inversion":
                record = self._invert(prompt_ids, objective, generator, cancel)
            else:
                ids, curve, method = search_prompt(self.backend, objective, prompt_ids, attack,
                                                   np.random.default_rng(search_seed), cancel=cancel)
                prefix = self.backend.decode_token_ids(ids[1 : 1 + attack.tokens])
                self.prefixes = (self.prefixes + [prefix])[-self.config.adversarial_prompts:]
                record = {"prefix": prefix, "prompt": f"{prefix} {prompt}", "search": method,
                          "objective_attacked": curve[-1]}
        except AttackCancelled as err:
            raise UnlearnCancelled("unlearning cancelled during an attack search; the model was left unchanged and "
                                   "nothing was written") from err
        phases.advance(max(0.0, 1.0 - counter.spent / attack.budget))  # the budget left unspent
        self.found.append({"step": step, "attack": self.config.adversarial_attack, **record, "objective_plain": plain,
                           "unet_passes": counter.spent, "seconds": round(time.perf_counter() - t0, 3)})

    def _invert(self, prompt_ids: list[int], objective: DenoisingObjective, generator: torch.Generator,
                cancel) -> dict:
        """The concept inversion on `prompt_ids` (the target's name replaced by the placeholder), its embedding
        kept; its record for `found`. `generator` draws its steps' noise and timesteps."""
        backend, attack = self.backend, self.attack
        table = backend.token_embedding_table().detach()
        candidates = candidate_token_ids(table, backend.special_token_ids())
        self.placeholder_id = int(candidates[0])
        ids, position = replace_name_with_placeholder(prompt_ids, backend.prompt_token_ids(self.request.target),
                                                      self.placeholder_id)
        embedding, _ = invert_concept(backend, objective, ids, position,
                                      initial_embedding(backend, table, candidates, attack), attack,
                                      generator, cancel=cancel)
        with torch.no_grad():
            attacked = float(objective.losses(inverted_context(backend, ids, position, embedding))[0])
        embedding = embedding.detach().float().cpu()  # [dim]
        self.embeddings = (self.embeddings + [embedding])[-self.config.adversarial_prompts:]
        return {"prompt": placeholder_prompt(backend, ids, position), "search": "inversion",
                "objective_attacked": attacked, "nearest_tokens": nearest_tokens(backend, table, candidates, embedding)}

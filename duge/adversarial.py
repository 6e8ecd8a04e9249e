"""Adversarial training (`UnlearnConfig.adversarial_every`, `duge unlearn --adversarial N`), as AdvUnlearn and
Receler do it: the trainer attacks its own edit at intervals and trains the erasure on what the attack found.

Every `adversarial_every` steps of a request (from that step on), `AdversarialSearch.search` runs the prompt
search of `duge.attacks` (`search_prompt`, UnlearnDiffAtk's objective) against the model as it is now — the
committed deltas and the request's trainable delta — on images of the target that the request's reference
model ε_φ drew when the request started:

    prefix* = argmin over k vocabulary tokens of  L(prefix + " " + target prompt)

with L the edited model's denoising loss on those images (`duge.attacks.DenoisingObjective`), at most
`adversarial_budget` UNet passes per search, the attack tokens before the prompt (AttackConfig's tokens and
search; the searched prompt is the request's next template with the target's name). The search changes no
weight and leaves the deltas' gradients alone.

The last `adversarial_prompts` prefixes found are kept; from then on every other row of the current
request (counted over the steps) trains on its target prompt with one of them in front, in turn
(`duge.batches.with_attack_prompts`). Only the trainable pass sees the prefix: the frozen teachers' targets stay those
of the row's plain prompt, so the attacked prompt is steered to the anchor like the plain one. The
prefixes enter as text (decoded and tokenized again, as a typed prompt would be). A request's prefixes are
not replayed by later requests, and each search is seeded from its request's seed and step, so a resumed
run finds the same ones.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .attacks import AttackCancelled, DenoisingObjective, PassCounter, search_prompt
from .backends.base import Backend
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
               "encode_tokens")  # what the prompt search needs of a backend (duge.attacks.TokenBackend)


def searches_in(steps: int, every: int) -> int:
    """How many searches a request of `steps` steps runs: at steps every, 2·every, ... below `steps`."""
    return (steps - 1) // every if every > 0 else 0


@dataclass
class AdversarialSearch:
    """One request's attack searches (module doc): the reference model's images of the target, the prefixes
    kept, and a record of every search (`found`: step, prompt, objective of the plain and attacked prompt,
    UNet passes, seconds — the request's `RequestResult.adversarial`)."""

    backend: Backend
    request: ResolvedRequest
    config: UnlearnConfig
    seed: int
    target_latents: torch.Tensor | None  # [N, C, h, w]; None when adversarial training is off
    max_rows: int  # UNet rows per call of the search's no-grad passes
    attack: AttackConfig  # the search's settings: AttackConfig's defaults, adversarial_budget, tokens before the prompt
    prefixes: list[str] = field(default_factory=list)
    found: list[dict] = field(default_factory=list)

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
            raise DugeError(f"adversarial_every needs a backend that gives the prompt search token ids and embeddings "
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
        """Search an attack prefix against the model as it is now; keep it (the last `adversarial_prompts`).
        Counts as one unit of the current phase, advanced by each UNet pass's share of the budget as it is spent."""
        t0, attack = time.perf_counter(), self.attack
        templates = self.request.templates
        prompt = render_prompt(templates[len(self.found) % len(templates)], self.request.target)
        prompt_ids = self.backend.prompt_token_ids(prompt)
        search_seed = int(np.random.SeedSequence([self.seed + ADVERSARIAL_SEED_OFFSET, step]).generate_state(1)[0])
        counter = PassCounter(attack.budget, on_spend=lambda passes: phases.advance(passes / attack.budget))
        objective = DenoisingObjective(self.backend, self.target_latents, attack.objective_timesteps,
                                       torch.Generator().manual_seed(search_seed), counter, self.max_rows)
        try:
            with torch.no_grad():
                plain = float(objective.losses(self.backend.encode_tokens(self.backend.pad_token_ids([prompt_ids])))[0])
            ids, curve, method = search_prompt(self.backend, objective, prompt_ids, attack,
                                               np.random.default_rng(search_seed), cancel=cancel)
        except AttackCancelled as err:
            raise UnlearnCancelled("unlearning cancelled during an attack search; the model was left unchanged and "
                                   "nothing was written") from err
        phases.advance(max(0.0, 1.0 - counter.spent / attack.budget))  # the budget left unspent
        prefix = self.backend.decode_token_ids(ids[1 : 1 + attack.tokens])
        self.prefixes = (self.prefixes + [prefix])[-self.config.adversarial_prompts:]
        self.found.append({"step": step, "prefix": prefix, "prompt": f"{prefix} {prompt}", "search": method,
                           "objective_plain": plain, "objective_attacked": curve[-1],
                           "unet_passes": counter.spent, "seconds": round(time.perf_counter() - t0, 3)})

"""Does an erased concept come back? Attacks on an edited model, one erased concept at a time.

Both attacks minimise the same objective, UnlearnDiffAtk's (Zhang et al., ECCV 2024): the
*edited* model's denoising loss on images of the target that the *unedited* model draws,

    L(c) = mean over fixed (x0, t, ε) of ‖ε_edited(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, c) − ε‖²

(the v-target for v-prediction models), where x0 are the unedited model's latents for the
concept's prompt and c is the text conditioning the attack controls. A low L means the edited
model, so prompted, reconstructs the erased concept's images.

- **Prompt search**: `tokens` (default 5) real vocabulary tokens before the prompt (or spread
  between its words). `greedy`: coordinate search — one position at a time, every token of the
  vocabulary tried, the best kept, until a sweep over all positions changes nothing or the budget
  is spent (fine for the built-in world's vocabulary of ~50 words). `gradient`: GCG-style — the
  gradient of L with respect to the one-hot token choices (through the text encoder's embedding)
  ranks `top_k` tokens per position, `candidates` single-token swaps among them are evaluated, the
  best is taken; this scales to CLIP's 49 408 tokens.
- **Concept inversion** (textual inversion, as diffusers' `textual_inversion` example trains it):
  the concept's name in the prompt is replaced by one new token whose input embedding is learnt
  by Adam on L, with fresh noise and timesteps each step, against the edited model.

The classifier never enters the objective: it only judges the result, on images the edited model
draws from the attack's prompt or embedding with held-out seeds (`AttackConfig.eval_seed`, never
one of the objective's). Post-attack UA is the share of those images the classifier does *not*
read as the concept; per concept it is the lowest over the unattacked prompt and each attack run.

Every attack spends at most `AttackConfig.budget` edited-UNet passes of one latent (a backward
pass counted as two), whatever the model, so attacks on different models are comparable. The
backend needs, besides `duge.backends.base.Backend`, the token calls of `TokenBackend`
(`DiffusersBackend` has them: SD 1.x and 2.x).

Adversarial training (`duge.adversarial`, `duge unlearn --adversarial N`) runs the prompt search or the
concept inversion inside the trainer, against the edit being trained, and trains on the prompts or
embeddings it finds.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from .backends.base import Backend
from .backends.diffusers_backend import DiffusersBackend
from .concepts import load_concept_set, resolve_request
from .config import BACKWARD_COST, AttackConfig
from .errors import DugeError
from .evaluation import ConceptClassifier, MeasuredConcept, concepts_for, find_concept, require_classifier
from .models import load_pipeline
from .world.callbacks import uses_builtin_world

PLACEHOLDER = "<concept>"  # how an inverted token is written in a reported prompt


class AttackCancelled(DugeError):
    """The attack was stopped by its cancel callback; nothing was returned."""


class TokenBackend(Backend, Protocol):
    """What an attack needs from a backend besides `Backend` (see `DiffusersBackend` for their contracts)."""

    def prompt_token_ids(self, prompt: str) -> list[int]: ...

    def pad_token_ids(self, rows: list[list[int]]) -> torch.Tensor: ...

    def special_token_ids(self) -> set[int]: ...

    def decode_token_ids(self, ids: list[int]) -> str: ...

    def token_embedding_table(self) -> torch.Tensor: ...

    def encode_tokens(self, ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor: ...

    def generate_from_context(self, context: torch.Tensor, seed: int, steps: int, guidance: float) -> torch.Tensor: ...


# ---------------------------------------------------------------- results


@dataclass
class AttackResult:
    """One attack on one concept: what it found, what it cost, and how the held-out images judge it."""

    attack: str  # "prompt" | "inversion"
    search: str  # "greedy" | "gradient" | "inversion"
    prompt: str  # the best prompt found; for inversion, with PLACEHOLDER where the learnt token goes
    token_ids: list[int]  # the prompt's ids, start and end tokens included (inversion: the placeholder's id)
    objective_plain: float  # L of the unattacked prompt, on the same fixed draws
    objective_best: float  # L of the result
    objective_curve: list[float]  # prompt search: the best L after each step; inversion: each step's L on its draws
    ua: float  # post-attack UA of this attack: share of held-out images not read as the concept
    unet_passes: int  # edited-UNet passes of one latent spent (a backward counted as BACKWARD_COST)
    seconds: float
    embedding: list[float] | None = None  # inversion: the learnt input embedding
    nearest_tokens: list[str] = field(default_factory=list)  # inversion: the vocabulary's closest (cosine)


@dataclass
class ConceptRobustness:
    """Every attack on one erased concept, beside the unattacked prompt on the same held-out seeds."""

    concept: str
    kind: str
    prompt: str  # the concept's plain prompt, which the attacks start from
    ua_plain: float  # UA of the plain prompt on the judgement's seeds
    attacks: list[AttackResult]
    images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)  # label -> [n, 3, H, W]

    @property
    def post_attack_ua(self) -> float:
        """The lowest UA over the plain prompt and every attack (the attacker picks the best)."""
        return min([self.ua_plain] + [a.ua for a in self.attacks])

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "images"}
        out["post_attack_UA"] = self.post_attack_ua
        return out


@dataclass
class RobustnessReport:
    """Attacks on every erased concept of one model; `post_attack_UA` is the mean over the concepts."""

    config: dict
    concepts: list[ConceptRobustness]
    seconds: float = 0.0

    @property
    def post_attack_ua(self) -> float | None:
        return float(np.mean([c.post_attack_ua for c in self.concepts])) if self.concepts else None

    @property
    def ua_plain(self) -> float | None:
        return float(np.mean([c.ua_plain for c in self.concepts])) if self.concepts else None

    def to_json(self) -> dict:
        return {"post_attack_UA": self.post_attack_ua, "UA_plain": self.ua_plain, "seconds": round(self.seconds, 2),
                "unet_passes": sum(a.unet_passes for c in self.concepts for a in c.attacks),
                "config": self.config, "concepts": [c.to_json() for c in self.concepts]}


# ---------------------------------------------------------------- the objective


@dataclass
class PassCounter:
    """Edited-UNet passes of one latent spent so far, against a budget; `on_spend(n)` hears of every n spent
    (adversarial training counts them on its progress bar)."""

    budget: int
    spent: int = 0
    on_spend: Callable[[int], None] | None = None

    def can_spend(self, passes: int) -> bool:
        return self.spent + passes <= self.budget

    def spend(self, passes: int) -> None:
        self.spent += passes
        if self.on_spend is not None:
            self.on_spend(passes)


def denoising_target(backend: Backend, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for z_t = add_noise(latents, noise, t): ε, or v = √ᾱ ε − √(1−ᾱ) x0."""
    if backend.prediction_type == "epsilon":
        return noise
    ones, zeros = torch.ones_like(latents), torch.zeros_like(latents)
    signal = backend.add_noise(ones, zeros, timesteps)  # √ᾱ_t, broadcast to the latents' shape
    noise_scale = backend.add_noise(zeros, ones, timesteps)  # √(1−ᾱ_t)
    return signal * noise - noise_scale * latents


class DenoisingObjective:
    """L(c) of the module doc on fixed draws: `timesteps_per_image` noise levels per target latent,
    stratified over the training schedule, with fixed noise (a deterministic function of c)."""

    def __init__(self, backend: Backend, target_latents: torch.Tensor, timesteps_per_image: int,
                 generator: torch.Generator, counter: PassCounter, max_rows: int = 256):
        self.backend, self.counter, self.max_rows = backend, counter, max_rows
        self.latents = target_latents.detach().float().cpu()  # [N, C, h, w]
        rows = len(self.latents) * timesteps_per_image
        total = backend.num_train_timesteps
        edges = torch.linspace(0, total, rows + 1)[:-1]
        timesteps = (edges + torch.rand(rows, generator=generator) * (total / rows)).long().clamp(max=total - 1)
        timesteps = timesteps[torch.randperm(rows, generator=generator)]
        x0 = self.latents.repeat_interleave(timesteps_per_image, 0)
        noise = torch.randn(x0.shape, generator=generator)
        device = backend.device
        self.timesteps = timesteps.to(device)  # [R]
        self.noisy = backend.add_noise(x0.to(device), noise.to(device), self.timesteps)  # [R, C, h, w]
        self.target = denoising_target(backend, x0.to(device), noise.to(device), self.timesteps)

    @property
    def rows(self) -> int:
        return len(self.timesteps)

    @torch.no_grad()
    def losses(self, contexts: torch.Tensor) -> torch.Tensor:
        """L of each of the contexts [B, tokens, dim] on every fixed draw: [B] (float32, on the CPU)."""
        pairs = torch.cartesian_prod(torch.arange(len(contexts)), torch.arange(self.rows))  # [B·R, 2]
        totals = torch.zeros(len(contexts))
        for chunk in pairs.split(self.max_rows):
            c, r = chunk[:, 0].to(self.backend.device), chunk[:, 1].to(self.backend.device)
            pred = self.backend.predict_noise(self.noisy[r], self.timesteps[r], contexts[c])
            err = (pred.float() - self.target[r].float()).pow(2).flatten(1).mean(1)  # [chunk]
            totals.index_add_(0, chunk[:, 0], err.cpu())
            self.counter.spend(len(chunk))
        return totals / self.rows

    def loss(self, context: torch.Tensor) -> torch.Tensor:
        """L of one context [1, tokens, dim] with gradients (a forward and a backward pass per draw)."""
        pred = self.backend.predict_noise(self.noisy, self.timesteps, context.expand(self.rows, -1, -1))
        self.counter.spend(self.rows * (1 + BACKWARD_COST))
        return (pred.float() - self.target.float()).pow(2).mean()

    def random_draws(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh (z_t [n, C, h, w], t [n], target [n, C, h, w]) from the same target latents (inversion's steps)."""
        pick = torch.randint(len(self.latents), (n,), generator=generator)
        timesteps = torch.randint(self.backend.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn((n, *self.latents.shape[1:]), generator=generator)
        device = self.backend.device
        x0, noise, timesteps = self.latents[pick].to(device), noise.to(device), timesteps.to(device)
        return (self.backend.add_noise(x0, noise, timesteps), timesteps,
                denoising_target(self.backend, x0, noise, timesteps))


# ---------------------------------------------------------------- token helpers


def candidate_token_ids(table: torch.Tensor, special_ids: set[int]) -> torch.Tensor:
    """Token ids an attack may use: not special, and one id per distinct embedding row (a vocabulary whose
    fragments share the unknown token's row, as the built-in world's does, counts each word once)."""
    table = table.detach().float().cpu()
    unique, inverse = torch.unique(table, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(table), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(table)), reduce="amin")
    special_rows = {int(inverse[i]) for i in special_ids if 0 <= i < len(table)}
    keep = sorted(int(first[row]) for row in range(len(unique)) if row not in special_rows)
    if not keep:
        raise DugeError("the tokenizer has no token an attack could use (every embedding row is a special token's)")
    return torch.tensor(keep)


def _split_prompt(ids: list[int]) -> tuple[int, list[int], int]:
    """(start id, word ids, end id) of a tokenized prompt."""
    if len(ids) < 2:
        raise DugeError(f"a tokenized prompt must hold start and end tokens, got {ids}")
    return ids[0], ids[1:-1], ids[-1]


def place_attack_tokens(prompt_ids: list[int], attack_ids: Sequence[int], position: str) -> tuple[list[int], list[int]]:
    """The prompt's ids with the attack tokens placed (prefix: after the start token; insert: attack token i
    before word round((i+1)·n/(k+1))), and the attack tokens' positions."""
    start, words, end = _split_prompt(prompt_ids)
    attack_ids = [int(i) for i in attack_ids]
    if position == "prefix":
        ids = [start, *attack_ids, *words, end]
        return ids, list(range(1, 1 + len(attack_ids)))
    k, n = len(attack_ids), len(words)
    cut = [round((i + 1) * n / (k + 1)) for i in range(k)]
    ids, positions = [start], []
    for j in range(n + 1):
        for i in (i for i in range(k) if cut[i] == j):
            positions.append(len(ids))
            ids.append(attack_ids[i])
        if j < n:
            ids.append(words[j])
    return ids + [end], positions


def replace_name_with_placeholder(prompt_ids: list[int], name_ids: list[int], placeholder_id: int) -> tuple[list[int], int]:
    """The prompt's ids with the first run of `name_ids` replaced by one placeholder token, and its position."""
    start, words, end = _split_prompt(name_ids)
    del start, end
    for i in range(1, len(prompt_ids) - len(words)):
        if prompt_ids[i : i + len(words)] == words:
            return prompt_ids[:i] + [placeholder_id] + prompt_ids[i + len(words):], i
    raise DugeError("the concept's name does not appear in its prompt's tokens; give a prompt that names it")


# ---------------------------------------------------------------- the attacks


Progress = Callable[[dict], None]


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise AttackCancelled("attack cancelled")


def search_prompt(backend: TokenBackend, objective: DenoisingObjective, prompt_ids: list[int], config: AttackConfig,
                  rng: np.random.Generator, progress: Progress | None = None,
                  cancel=None) -> tuple[list[int], list[float], str]:
    """The attack tokens placed in the prompt that give the lowest L found within the budget:
    (the prompt's ids with them, L after each step, the search used: "greedy" or "gradient")."""
    table = backend.token_embedding_table().detach()
    candidates = candidate_token_ids(table, backend.special_token_ids())
    search = config.search
    if search == "auto":
        search = "greedy" if len(candidates) <= config.greedy_vocabulary_limit else "gradient"
    counter = objective.counter

    def contexts(rows: list[list[int]]) -> torch.Tensor:
        ids = [place_attack_tokens(prompt_ids, row, config.position)[0] for row in rows]
        with torch.no_grad():
            return backend.encode_tokens(backend.pad_token_ids(ids))

    # Greedy starts from every position holding the same token, the one that gives the lowest L (one
    # sweep over the vocabulary); the gradient search from random tokens (that sweep would cost the
    # vocabulary's size times the draws).
    if counter.can_spend(len(candidates) * objective.rows) and search == "greedy":
        losses = objective.losses(contexts([[token] * config.tokens for token in candidates.tolist()]))
        j = int(losses.argmin())
        attack, best_loss = [int(candidates[j])] * config.tokens, float(losses[j])
    else:
        attack = [int(i) for i in rng.choice(candidates.numpy(), size=config.tokens)]
        best_loss = float(objective.losses(contexts([attack]))[0])
    best, curve = list(attack), [best_loss]
    if search == "greedy":
        unchanged, position = 0, 0
        while unchanged < config.tokens and counter.can_spend(len(candidates) * objective.rows):
            _check_cancel(cancel)
            trials = [list(attack) for _ in candidates]
            for trial, token in zip(trials, candidates.tolist()):
                trial[position] = token
            losses = objective.losses(contexts(trials))
            j = int(losses.argmin())
            if float(losses[j]) < best_loss and trials[j][position] != attack[position]:
                attack, best_loss, best, unchanged = trials[j], float(losses[j]), trials[j], 0
            else:
                unchanged += 1
            position = (position + 1) % config.tokens
            curve.append(best_loss)
            if progress:
                progress({"attack": "prompt", "search": search, "spent": counter.spent, "loss": best_loss})
    else:
        allowed = torch.zeros(len(table), dtype=torch.bool)
        allowed[candidates] = True
        step_cost = objective.rows * (1 + BACKWARD_COST) + config.candidates * objective.rows
        while counter.can_spend(step_cost):
            _check_cancel(cancel)
            ids, positions = place_attack_tokens(prompt_ids, attack, config.position)
            ids_tensor = backend.pad_token_ids([ids])  # [1, tokens]
            one_hot = torch.zeros(config.tokens, len(table), device=table.device, dtype=table.dtype)
            one_hot[torch.arange(config.tokens), torch.tensor(attack)] = 1
            one_hot.requires_grad_(True)
            embeds = table[ids_tensor[0]].index_put((torch.tensor(positions, device=table.device),), one_hot @ table)
            loss = objective.loss(backend.encode_tokens(ids_tensor, embeds[None]))
            grad = torch.autograd.grad(loss, one_hot)[0].float().cpu()  # [tokens, vocabulary]
            grad[:, ~allowed] = float("inf")
            top = (-grad).topk(min(config.top_k, len(candidates)), dim=1).indices  # [tokens, top_k]
            trials = []
            for _ in range(config.candidates):
                trial = list(attack)
                p = int(rng.integers(config.tokens))
                trial[p] = int(top[p, rng.integers(top.shape[1])])
                trials.append(trial)
            losses = objective.losses(contexts(trials))
            j = int(losses.argmin())
            attack = trials[j]  # GCG moves to the batch's best even when it is worse (leaves local minima)
            if float(losses[j]) < best_loss:
                best, best_loss = trials[j], float(losses[j])
            curve.append(best_loss)
            if progress:
                progress({"attack": "prompt", "search": search, "spent": counter.spent, "loss": best_loss})
    return place_attack_tokens(prompt_ids, best, config.position)[0], curve, search


def inverted_context(backend: TokenBackend, ids: list[int], position: int, embedding: torch.Tensor) -> torch.Tensor:
    """Text conditioning [1, tokens, dim] of `ids` with the input embedding at `position` replaced by
    `embedding` [dim] (gradients flow back to it)."""
    table = backend.token_embedding_table().detach()
    ids_tensor = backend.pad_token_ids([ids])  # [1, tokens]
    where = torch.tensor([position], device=table.device)
    embeds = table[ids_tensor[0]].float().index_put((where,), embedding.to(table.device)[None].float())
    return backend.encode_tokens(ids_tensor, embeds[None].to(table.dtype))


def invert_concept(backend: TokenBackend, objective: DenoisingObjective, ids: list[int], position: int,
                   initial: torch.Tensor, config: AttackConfig, generator: torch.Generator,
                   progress: Progress | None = None, cancel=None) -> tuple[torch.Tensor, list[float]]:
    """A learnt input embedding [dim] for the token at `position` of `ids`: Adam on L with fresh draws. Changes
    no weight and no `.grad` but the embedding's own."""
    embedding = initial.detach().clone().float().to(backend.device).requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=config.inversion_learning_rate)
    n = config.inversion_batch
    step_cost = n * (1 + BACKWARD_COST)
    curve = []
    while objective.counter.can_spend(step_cost + objective.rows):  # rows: the final measurement of L
        _check_cancel(cancel)
        noisy, timesteps, target = objective.random_draws(n, generator)
        pred = backend.predict_noise(noisy, timesteps, inverted_context(backend, ids, position, embedding).expand(n, -1, -1))
        loss = (pred.float() - target.float()).pow(2).mean()
        # The gradient of the embedding alone: no other tensor's `.grad` is touched (adversarial training runs
        # this against a model whose trainable deltas hold the step's gradients).
        embedding.grad = torch.autograd.grad(loss, embedding)[0]
        optimizer.step()
        objective.counter.spend(step_cost)
        curve.append(float(loss.detach()))
        if progress:
            progress({"attack": "inversion", "search": "inversion", "spent": objective.counter.spent,
                      "loss": curve[-1]})
    return embedding.detach(), curve


def judge(backend: TokenBackend, context: torch.Tensor, classifier: ConceptClassifier, concept: MeasuredConcept,
          config: AttackConfig) -> tuple[float, torch.Tensor]:
    """(UA, images): the share of `eval_images` images drawn from `context` [1, tokens, dim] with the held-out
    seeds that the classifier does not read as the concept, and the images [n, 3, H, W]."""
    images = backend.generate_from_context(context.detach().expand(config.eval_images, -1, -1), config.eval_seed,
                                           config.sample_steps, config.guidance)
    predicted = classifier.predict(images)[concept.kind]
    return float(np.mean([p != concept.name for p in predicted])), images


def target_latents(base: Backend, prompt: str, config: AttackConfig) -> torch.Tensor:
    """The unedited model's latents for `prompt`, seeds config.seed ... (the objective's images): [N, C, h, w]."""
    return base.sample_latents([prompt] * config.objective_images, config.seed, config.sample_steps,
                               config.guidance).detach().cpu()


def attack_concept(edited: TokenBackend, latents: torch.Tensor, classifier: ConceptClassifier,
                   concept: MeasuredConcept, config: AttackConfig, prompt: str | None = None,
                   progress: Progress | None = None, cancel=None) -> ConceptRobustness:
    """Every attack of `config` on one concept of the `edited` model, with the unedited model's `latents`
    of its prompt (`target_latents`). `prompt`: default the concept's retention prompt (naming it alone)."""
    config.validate()
    prompt = prompt if prompt is not None else concept.retention_prompt
    prompt_ids = edited.prompt_token_ids(prompt)
    with torch.no_grad():
        plain_context = edited.encode_tokens(edited.pad_token_ids([prompt_ids]))
    ua_plain, plain_images = judge(edited, plain_context, classifier, concept, config)
    images = {"plain prompt": plain_images}
    results = []
    for attack in config.attacks:
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        counter = PassCounter(config.budget)
        objective = DenoisingObjective(edited, latents, config.objective_timesteps, generator, counter)
        objective_plain = float(objective.losses(plain_context)[0])
        if progress:
            progress({"concept": concept.name, "attack": attack, "spent": counter.spent, "loss": objective_plain})
        report = (lambda info: progress({"concept": concept.name, **info})) if progress else None
        run = _prompt_attack if attack == "prompt" else _inversion_attack
        result, context = run(edited, objective, prompt, prompt_ids, concept, config, rng, generator, report, cancel)
        result.objective_plain = objective_plain
        result.ua, images[f"{attack} attack"] = judge(edited, context, classifier, concept, config)
        result.unet_passes = counter.spent
        result.seconds = time.perf_counter() - t0
        results.append(result)
    return ConceptRobustness(concept.name, concept.kind, prompt, ua_plain, results, images)


def _prompt_attack(edited: TokenBackend, objective, prompt, prompt_ids, concept, config, rng, generator, progress, cancel):
    """The prompt search's AttackResult (UA still to judge) and the found prompt's conditioning."""
    ids, curve, search = search_prompt(edited, objective, prompt_ids, config, rng, progress, cancel)
    with torch.no_grad():
        context = edited.encode_tokens(edited.pad_token_ids([ids]))
    return AttackResult("prompt", search, edited.decode_token_ids(ids), ids, float("nan"), curve[-1], curve,
                        ua=float("nan"), unet_passes=0, seconds=0.0), context


def _inversion_attack(edited: TokenBackend, objective, prompt, prompt_ids, concept, config, rng, generator, progress, cancel):
    """The concept inversion's AttackResult (UA still to judge) and the learnt token's conditioning."""
    table = edited.token_embedding_table().detach()
    candidates = candidate_token_ids(table, edited.special_token_ids())
    initial = initial_embedding(edited, table, candidates, config)
    name_ids = edited.prompt_token_ids(_name_in_prompt(prompt, concept))
    ids, position = replace_name_with_placeholder(prompt_ids, name_ids, int(candidates[0]))
    embedding, curve = invert_concept(edited, objective, ids, position, initial, config, generator, progress, cancel)
    with torch.no_grad():
        context = inverted_context(edited, ids, position, embedding)
        final = float(objective.losses(context)[0])
    return AttackResult("inversion", "inversion", placeholder_prompt(edited, ids, position), ids, float("nan"), final,
                        curve, ua=float("nan"), unet_passes=0, seconds=0.0,
                        embedding=[round(float(v), 6) for v in embedding.cpu()],
                        nearest_tokens=nearest_tokens(edited, table, candidates, embedding)), context


def initial_embedding(backend: TokenBackend, table: torch.Tensor, candidates: torch.Tensor,
                      config: AttackConfig) -> torch.Tensor:
    """Where the inversion's embedding [dim] starts: the `initializer` word's, or the mean of the candidates'."""
    if config.initializer:
        init_ids = backend.prompt_token_ids(config.initializer)[1:-1]
        if len(init_ids) != 1:
            raise DugeError(f"attack setting initializer {config.initializer!r} is {len(init_ids)} tokens; "
                            "expected a word that is one token")
        return table[init_ids[0]].float()
    return table[candidates.to(table.device)].float().mean(0)


def nearest_tokens(backend: TokenBackend, table: torch.Tensor, candidates: torch.Tensor, embedding: torch.Tensor,
                   count: int = 3) -> list[str]:
    """The `count` candidate tokens whose embeddings are closest (cosine) to `embedding` [dim]."""
    rows = table[candidates.to(table.device)].float()
    similarity = torch.nn.functional.cosine_similarity(rows, embedding[None].to(rows.device).float(), dim=-1)
    return [backend.decode_token_ids([int(candidates[i])]) for i in similarity.topk(min(count, len(rows))).indices.cpu()]


def placeholder_prompt(backend: TokenBackend, ids: list[int], position: int) -> str:
    """The prompt of `ids` as text, with PLACEHOLDER for the learnt token at `position`."""
    words = (backend.decode_token_ids(ids[:position]), PLACEHOLDER, backend.decode_token_ids(ids[position + 1:]))
    return " ".join(w for w in words if w)


def _name_in_prompt(prompt: str, concept: MeasuredConcept) -> str:
    """The name of the concept that `prompt` uses (the longest that appears in it)."""
    words = f" {' '.join(prompt.lower().split())} "
    for name in sorted(concept.names, key=len, reverse=True):
        if f" {name.lower()} " in words:
            return name
    raise DugeError(f"prompt {prompt!r} does not name {concept.name!r} by any of its names "
                    f"({', '.join(concept.names)}); the inversion replaces the name with its token")


def attack_concepts(edited: TokenBackend, base: Backend, classifier: ConceptClassifier,
                    concepts: Sequence[MeasuredConcept], config: AttackConfig, progress: Progress | None = None,
                    cancel=None) -> RobustnessReport:
    """`attack_concept` for each concept; the unedited model (`base`) draws the objectives' images first."""
    config.validate()
    t0 = time.perf_counter()
    latents = {c.name: target_latents(base, c.retention_prompt, config) for c in concepts}
    if progress:
        progress({"total": config.budget * len(config.attacks) * len(concepts)})
    results = [attack_concept(edited, latents[c.name], classifier, c, config, progress=progress, cancel=cancel)
               for c in concepts]
    return RobustnessReport(asdict(config), results, time.perf_counter() - t0)


def erased_concepts(requests, classifier: ConceptClassifier, builtin_world: bool) -> list[MeasuredConcept]:
    """The classifier's concept for each request's target, in order, each once."""
    known = concepts_for(classifier, builtin_world)
    found = [find_concept(r.target, known) for r in requests]
    return list({c.name: c for c in found}.values())


def attack_models(model: str, base: str, concepts_path: str, config: AttackConfig,
                  classifier: ConceptClassifier | None = None, progress: Progress | None = None, cancel=None,
                  allow_pickle: bool = False, config_dir: str | None = None, log=print) -> RobustnessReport:
    """Attack every target of the concept set in `model` (the edited model), with `base` (the model it was edited
    from) drawing the objectives' images. Both are loaded through `duge.models.load_pipeline` (checked weights);
    only one is in memory at a time. `classifier`: default the built-in evaluator on the built-in world."""
    config.validate()
    concept_set = load_concept_set(concepts_path)
    t0 = time.perf_counter()
    log(f"loading the unedited model '{base}' ...")
    base_pipe = load_pipeline(base, config_dir=config_dir, allow_pickle=allow_pickle)
    builtin_world = uses_builtin_world(base_pipe)
    classifier = require_classifier(builtin_world, classifier, f"'{base}'")
    requests = [resolve_request(r, builtin_world=builtin_world) for r in concept_set.requests]
    concepts = erased_concepts(requests, classifier, builtin_world)
    base_backend = DiffusersBackend(base_pipe, dtype="float32")
    log(f"drawing the unedited model's images of {len(concepts)} concept(s) ...")
    latents = {c.name: target_latents(base_backend, c.retention_prompt, config) for c in concepts}
    del base_backend, base_pipe
    gc.collect()
    if progress:
        progress({"total": config.budget * len(config.attacks) * len(concepts)})
    log(f"loading the edited model '{model}' ...")
    edited = DiffusersBackend(load_pipeline(model, config_dir=config_dir, allow_pickle=allow_pickle), dtype="float32")
    results = [attack_concept(edited, latents[c.name], classifier, c, config, progress=progress, cancel=cancel)
               for c in concepts]
    return RobustnessReport(asdict(config), results, time.perf_counter() - t0)

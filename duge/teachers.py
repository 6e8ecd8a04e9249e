"""Teachers computed once per request, and replay with equal weight per earlier request (design doc §2.1).

When request k starts, a pool of training rows is drawn from its cached images — noised latents
z_t at timesteps t, with their target prompts — and the frozen models' outputs on them are
computed once, in no-grad passes:

- the output term's target (`duge.targets.OBJECTIVES`: ε_φ(z_t, anchor), for DUGE guided away
  from the target along θ0's target-minus-anchor direction) and the anchor's attention maps, with
  φ the model as request k−1 left it;
- the prior term's target on the related rows: θ0's prediction for a prompt that names no erased
  concept (θ0 is the teacher of what was never erased, so one request's erosion does not become
  the next request's target), φ's for one that names an erased concept (θ0 would draw it back),
  including one an earlier run on the model erased (a continued ComfyUI session's θ0 still draws it).

Every step then draws its rows from the pools, and only the trainable pass runs. A replayed row of
an earlier request keeps the target its own request trained against (its pool is kept, frozen).
The earlier requests share the replay rows in a cycle (`duge.batches.replay_requests`), so each
gets the same number of rows over the sequence, however many there are.

`request_pool` builds a request's pool from its own seed; `rebuild_pools` builds the finished
requests' pools again, as they were, when a sequential run resumes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends.base import Backend
from .batches import Batch, draw_batch, replay_requests
from .concepts import ResolvedRequest, erased_keys
from .config import TEACHER_POOL_SEED_OFFSET, UnlearnConfig, request_seed
from .edits import LayerEdits
from .harness import micro_batches
from .image_cache import RequestCache
from .methods import Method
from .phases import Phases, current_phases
from .targets import OBJECTIVES


@dataclass
class TeacherPool:
    """One request's training rows and its teachers' outputs on them (on the CPU; moved per step)."""

    rows: Batch  # N rows: zt [N, C, h, w], t [N], prompts, words, anchor tokens; and the related rows
    target: torch.Tensor  # [N, C, h, w]: the output term's target for each row
    anchor_maps: list[torch.Tensor] = field(default_factory=list)  # per captured layer [N, heads, HW]; [] if unused
    related_target: torch.Tensor | None = None  # [M, C, h, w]: the prior term's target for each related row

    def __len__(self) -> int:
        return len(self.rows.t)


def names_erased(prompt: str, erased: set[str]) -> bool:
    """Whether `prompt` names one of the `erased` concepts (lower-case names; multi-word names as phrases)."""
    text = f" {' '.join(prompt.lower().split())} "
    return any(f" {name} " in text for name in erased)


def without_erased_related(pool: TeacherPool, erased: set[str]) -> TeacherPool:
    """`pool` without its related rows that name an erased concept: the continual rule
    (`duge.concepts.preserved_at`) — a concept erased since the pool was built is no longer replayed."""
    rows = pool.rows
    if rows.related_zt is None or not rows.related_prompts:
        return pool
    keep = [i for i, prompt in enumerate(rows.related_prompts) if not names_erased(prompt, erased)]
    if len(keep) == len(rows.related_prompts):
        return pool
    index = torch.tensor(keep, dtype=torch.long)
    kept_rows = dataclasses.replace(rows, related_zt=rows.related_zt[index], related_t=rows.related_t[index],
                                    related_prompts=[rows.related_prompts[i] for i in keep])
    return dataclasses.replace(pool, rows=kept_rows,
                               related_target=None if pool.related_target is None else pool.related_target[index])


def build_teacher_pool(backend: Backend, edits: LayerEdits, cache: RequestCache, method: Method, config: UnlearnConfig, size: int,
                       rng: np.random.Generator, generator: torch.Generator, erased: set[str],
                       micro_batch_size: int = 0, phases: Phases | None = None) -> TeacherPool:
    """`size` rows drawn from `cache` as a step draws them, with the teachers' outputs (module doc).

    `erased`: every name of every concept erased so far, the current request's included, and by an earlier
    run on the model (lower case). The teachers' passes are a phase of kind "training" on `phases`
    ("teachers for '<target>'"), counted in rows (anchor and related) micro-batch by micro-batch.
    """
    rows = draw_batch(backend, [cache], method, dataclasses.replace(config, batch_size=size, related_batch_size=None),
                      rng, generator)
    capture = method.attention_term and config.beta > 0
    related = len(rows.related_prompts) if rows.related_zt is not None else 0
    phases = current_phases(phases)
    target_name = cache.request.target
    with phases.phase(f"teachers for '{target_name}'", size + related, "row", "training", target=target_name):
        targets, maps = [], []
        for part in micro_batches(slice(0, size), micro_batch_size):
            part_rows = rows[part]
            target, part_maps, _ = OBJECTIVES[method.objective].target(backend, edits, part_rows, method, config, capture)
            targets.append(target.detach().float().cpu())
            maps.append([m.detach().float().cpu() for m in part_maps])
            phases.advance(part.stop - part.start)
        anchor_maps = [torch.cat(layer) for layer in zip(*maps)] if capture else []
        related_target = None
        if related:
            related_target = torch.empty(rows.related_zt.shape)
            with torch.no_grad():
                for part in micro_batches(slice(0, related), micro_batch_size):
                    prompts = rows.related_prompts[part]
                    context = backend.encode_prompts(prompts)
                    kept = torch.tensor([not names_erased(p, erased) for p in prompts])
                    with edits.disabled():  # θ0: the teacher of concepts never erased
                        from_theta0 = backend.predict_noise(rows.related_zt[part], rows.related_t[part], context)
                    if not bool(kept.all()):
                        with edits.reference():  # a prompt naming an erased concept: the model as the last request left it
                            from_reference = backend.predict_noise(rows.related_zt[part], rows.related_t[part], context)
                        from_theta0 = torch.where(kept.to(from_theta0.device)[:, None, None, None], from_theta0,
                                                  from_reference)
                    related_target[part] = from_theta0.float().cpu()
                    phases.advance(part.stop - part.start)
    return TeacherPool(_to_cpu(rows), torch.cat(targets), anchor_maps, related_target)


def pool_size(config: UnlearnConfig, steps: int) -> int:
    """Rows in a request's pool: `config.teacher_pool`, but no more than the request's own steps draw
    (steps × batch_size; a short request does not pay for 128 rows' teachers)."""
    return max(1, min(config.teacher_pool, steps * config.batch_size))


def request_pool(backend: Backend, edits: LayerEdits, cache: RequestCache, method: Method, config: UnlearnConfig,
                 seed: int, erased: set[str], micro_batch_size: int = 0, steps: int | None = None,
                 phases: Phases | None = None) -> TeacherPool:
    """A request's teacher pool of `pool_size` rows (`steps`: the request's; None: `config.steps`), drawn with its
    own seed (the request's seed plus `TEACHER_POOL_SEED_OFFSET`), its passes counted on `phases`."""
    pool_seed = seed + TEACHER_POOL_SEED_OFFSET
    return build_teacher_pool(backend, edits, cache, method, config, pool_size(config, steps or config.steps),
                              np.random.default_rng(pool_seed), torch.Generator().manual_seed(pool_seed), erased,
                              micro_batch_size, phases)


def rebuild_pools(backend: Backend, edits: LayerEdits, method: Method, config: UnlearnConfig,
                  requests: list[ResolvedRequest], caches: list[RequestCache], deltas: list[dict],
                  micro_batch_size: int = 0, erased_before: set[str] = frozenset(),
                  phases: Phases | None = None) -> list[TeacherPool]:
    """The teacher pools of the requests a resumed sequential run had finished (one per cache), as they were
    built: request j's from the model θ0 + Σ_{i<j} ΔW_i (`deltas`: each request's ΔW per layer), with its own
    seed and `erased_before` (name keys an earlier run erased) counted as erased. The committed deltas are
    restored afterwards."""
    final = edits.committed()
    pools = []
    try:
        for j, cache in enumerate(caches):
            edits.load_committed({name: sum((d[name] for d in deltas[:j]), torch.zeros_like(final[name]))
                                  for name in final})
            seed = request_seed(config, j, requests[j].seed)
            erased = erased_keys(requests[: j + 1], erased_before)
            pools.append(request_pool(backend, edits, cache, method, config, seed, erased, micro_batch_size,
                                      requests[j].steps or config.steps, phases))
    finally:
        edits.load_committed(final)
    return pools


def merge_pools(pools: list[TeacherPool]) -> TeacherPool:
    """Several requests' pools as one (the simultaneous setting draws every step's rows from all alike)."""
    rows = _cat_rows([p.rows for p in pools])
    related = [p for p in pools if p.related_target is not None]
    if related:
        rows.related_zt = torch.cat([p.rows.related_zt for p in related])
        rows.related_t = torch.cat([p.rows.related_t for p in related])
        rows.related_prompts = [x for p in related for x in p.rows.related_prompts]
    maps = [torch.cat(layer) for layer in zip(*[p.anchor_maps for p in pools])] if pools[0].anchor_maps else []
    return TeacherPool(rows, torch.cat([p.target for p in pools]), maps,
                       torch.cat([p.related_target for p in related]) if related else None)


def _to_cpu(rows: Batch) -> Batch:
    return dataclasses.replace(rows, **{f.name: getattr(rows, f.name).cpu() for f in dataclasses.fields(rows)
                                        if isinstance(getattr(rows, f.name), torch.Tensor)})


@dataclass
class PoolRows:
    """One step's rows taken from the pools: the trainable pass's inputs and the frozen targets."""

    rows: Batch  # anchor part: current request's rows, then the replayed ones; related part: current request's
    target: torch.Tensor  # [b, C, h, w]
    anchor_maps: list[torch.Tensor]  # per captured layer [b, heads, HW]
    related_target: torch.Tensor | None  # [r, C, h, w]


def draw_pool_rows(pools: list[TeacherPool], config: UnlearnConfig, rng: np.random.Generator, step: int,
                   replay: int, device) -> PoolRows:
    """`config.batch_size` rows of the current request's pool (the last) and `replay` rows of the earlier
    pools, one pool per row as `replay_requests` cycles; the related rows are the current pool's,
    `config.related_rows` of them. Rows are drawn with the same `rng` in every process."""
    current = pools[-1]
    picks = [(len(pools) - 1, int(i)) for i in rng.integers(0, len(current), config.batch_size)]
    picks += [(p, int(rng.integers(0, len(pools[p])))) for p in replay_requests(len(pools) - 1, replay, step)]
    pieces = [(pools[p], torch.tensor([i])) for p, i in picks]
    rows = _cat_rows([pool.rows[slice(int(i), int(i) + 1)] for pool, i in pieces])
    target = torch.cat([pool.target[i] for pool, i in pieces])
    maps = ([torch.cat(layer) for layer in zip(*[[m[i] for m in pool.anchor_maps] for pool, i in pieces])]
            if current.anchor_maps else [])
    related_target = None
    if current.related_target is not None:
        r = torch.as_tensor(rng.integers(0, len(current.related_target), config.related_rows))
        rows.related_zt, rows.related_t = current.rows.related_zt[r], current.rows.related_t[r]
        rows.related_prompts = [current.rows.related_prompts[int(i)] for i in r]
        related_target = current.related_target[r]
    return PoolRows(_to_device(rows, device), target.to(device), [m.to(device) for m in maps],
                    related_target.to(device) if related_target is not None else None)


def _cat_rows(parts: list[Batch]) -> Batch:
    """Rows of several pools as one batch; token columns padded to the widest (masked out)."""
    def cat(values):
        if not isinstance(values[0], torch.Tensor):
            return [v for vs in values for v in vs]
        if values[0].dim() == 2:  # [rows, token columns]
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
        return torch.cat(values)

    names = ("zt", "t", "target_prompts", "anchor_prompts", "target_words", "tok_anchor", "mask_anchor", "has_anchor")
    return Batch(**{name: cat([getattr(p, name) for p in parts]) for name in names})


def _to_device(rows: Batch, device) -> Batch:
    return dataclasses.replace(rows, **{f.name: getattr(rows, f.name).to(device) for f in dataclasses.fields(rows)
                                        if isinstance(getattr(rows, f.name), torch.Tensor)})

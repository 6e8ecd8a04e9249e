"""The continual unlearning loop: `unlearn` runs a concept set's requests in one of three settings.

sequential (the default): each request starts from the last result; independent: each from θ0,
the results merged at the end; simultaneous: all requests in one optimisation. Per request the
reference model generates the images the losses need (`duge.image_cache`), then `train_request`
optimises the trainable deltas on the cross-attention K/V with the method's objective
(`duge.objective`: L = L_xattn + λ_prior · L_prior + λ_reg · L_reg, design doc §2). With
`adversarial_every` the request also attacks its own edit at intervals and trains on the attack
prompts or embeddings found (`duge.adversarial`).

The frozen reference ε_φ of request k is the model as request k−1 left it (θ0 for the first request
and in the independent setting); the regulariser anchors to θ0. Why: docs/method.md.

The host model is never changed: edits are deltas removed when the run ends, so an error, Ctrl-C
or a cancel callback leaves the host bit-identical and returns nothing (`duge.harness`).
`on_request_done` sees each finished request (`duge.progress` checkpoints it) and `resume`
continues from such checkpoints with the same result as a run never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .backends.base import Backend
from .adversarial import AdversarialSearch, searches_in
from .concepts import ResolvedRequest, erased_keys, names_keys
from .config import UnlearnConfig, request_seed
from .distributed import check_batch
from .edits import LayerEdits, trainable_pattern
from .errors import DugeError
from .fisher import run_fisher
from .harness import RequestRollback, TrainingDiverged, UnlearnCancelled, check_cancel, interrupt_as_cancel
from .image_cache import RequestCache, load_or_build_request_cache, replayed_caches
from .memory import RunMemory
from .methods import Method, get_method
from .objective import pooled_step_terms, step_terms
from .output_erasure import directions_so_far, remove_directions, request_directions
from .preservation import preservation_moments, projected_parameters, projected_updates
from .phases import Phases, current_phases
from .results import ProgressFn, RequestDoneFn, RequestResult, ResumeState, UnlearnResult
from .teachers import TeacherPool, merge_pools, rebuild_pools, request_pool, without_erased_related
from .uce import commit_uce_request

__all__ = ["unlearn", "train_request", "UnlearnConfig", "UnlearnCancelled", "TrainingDiverged"]


@dataclass(frozen=True)
class Run:
    """What every request of a run shares."""

    backend: Backend
    edits: LayerEdits
    method: Method
    config: UnlearnConfig
    fisher: dict | None  # name → diagonal Fisher [out, in] (regularizer "fisher"), else None
    memory: RunMemory
    cancel: Callable[[], bool] | None
    progress: ProgressFn | None
    phases: Phases


def same_moment(moments: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The request's C (`preservation_moments` gives every text K/V layer the same one), or None without it."""
    return next(iter(moments.values()), None)


def train_request(run: Run, caches: list[RequestCache], steps: int, learning_rate: float, seed: int, label: str,
                  replay: bool = False, moments: dict | None = None, pools: list[TeacherPool] | None = None,
                  erased: set[str] = frozenset()) -> tuple[dict, dict, list[dict]]:
    """Optimise one request (the last of `caches`; the earlier ones replayed when `replay`, all alike when
    simultaneous) and commit it. Returns its ΔW per layer, the last step's loss terms and its attack searches
    (`config.adversarial_every`, `duge.adversarial`: every N steps an attack prompt or embedding found against
    the edit joins the request's target prompts; [] when off).

    `moments`: layer name → the second moment C of the text states to preserve (`duge.preservation`), for the
    penalty and projection regularisers. `pools`: the earlier requests' teacher pools when the method pools
    its teachers (`duge.teachers`); this request's pool(s) are built here and appended. `erased`: every name
    of every concept erased so far, this request's and an earlier run's included (the related rows' teacher rule)."""
    edits, config, method = run.edits, run.config, run.method
    if method.objective == "closed_form":  # no optimisation: UCE's edit (`duge.uce`)
        with run.phases.phase(f"closed form for '{label}'", 1, "edit", "training", target=label):
            delta = commit_uce_request(run.backend, edits, [c.request for c in caches], config,
                                       from_original=method.resolve_from_original)
            run.phases.advance(1)
        return delta, {}, []
    rollback = RequestRollback(edits, label)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    params = edits.start_request(seed)
    replay_rows = config.replay_batch_size if len(caches) > 1 and replay else 0
    micro_batch_size = run.memory.step_micro_batch_size(params, caches[-1])
    projected = projected_parameters(edits, moments or {}, config.projection_mu) \
        if method.regularizer_kind(config.regularizer) == "projection" else []
    if pools is not None:  # add this request's pool; replay without related rows of concepts erased since
        new = [request_pool(run.backend, edits, cache, method, config, seed, erased, micro_batch_size, steps, run.phases)
               for cache in (caches if config.setting == "simultaneous" else caches[-1:])]
        pools.append(merge_pools(new) if len(new) > 1 else new[0])
        replayed_pools = [without_erased_related(p, erased) for p in (pools if replay else pools[-1:])]
    attacks = AdversarialSearch.start(run.backend, edits, caches[-1].request, config, seed,
                                      micro_batch_size or config.batch_size + replay_rows, run.phases)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    losses = {}
    searches = searches_in(steps, config.adversarial_every)  # each counts as one unit of the training phase
    with run.phases.phase(f"training '{label}'", steps + searches, "step", "training", target=label):
        for step in range(steps):
            check_cancel(run.cancel)
            if attacks.due(step):  # an attack prompt against the edit as it is now
                attacks.search(step, run.phases, run.cancel)
            optimizer.zero_grad(set_to_none=True)
            if pools is not None:
                losses = pooled_step_terms(run.backend, edits, replayed_pools, method, config, rng,
                                           run.fisher, replay_rows, micro_batch_size, step, moments, attacks.inputs)
            else:
                losses = step_terms(run.backend, edits, caches, method, config, rng, generator, run.fisher,
                                    replay=replay_rows, micro_batch_size=micro_batch_size, step=step, moments=moments,
                                    attacks=attacks.inputs)
            with projected_updates(projected):  # each update onto the soft null space of the preserved inputs
                rollback.step(optimizer, params, losses["total"], step)
            run.phases.advance(1)
            if run.progress:
                run.progress({"request": label, "step": step + 1, "steps": steps, "losses": losses})
    return rollback.commit(), losses, attacks.found


def unlearn(backend: Backend, requests: list[ResolvedRequest], config: UnlearnConfig, general_prompts: list[str] = (),
            image_filter=None, evaluate=None, progress: ProgressFn | None = None,
            cancel: Callable[[], bool] | None = None, start_deltas: dict[str, torch.Tensor] | None = None,
            start_index: int = 0, resume: ResumeState | None = None,
            on_request_done: RequestDoneFn | None = None, phases: Phases | None = None,
            erased_before: Sequence[str] = ()) -> UnlearnResult:
    """Erase `requests` from the backend's model, in order.

    `requests` are resolved once by the caller (`duge.concepts.resolve_concept_set` with the run's
    setting, which applies the continual rule); `general_prompts` are the concept set's, for the
    Fisher estimate and the preserved inputs (default: each request's first anchor prompt).
    `evaluate(backend, requests_so_far) -> dict` is called after each request with the edits
    enabled (the current model). `progress(info)` receives step-level information; `phases`
    (`duge.phases`) each request's image generation and training, counted as the work is done. Raises
    UnlearnCancelled if `cancel()` returns True or on KeyboardInterrupt; the host is unchanged.
    `start_deltas` are deltas already on the model before request 0 (a continued ComfyUI session; in the
    independent setting every request starts from them, and the total keeps them);
    `start_index` skips the first requests. `on_request_done(k, result, cache)` is called after
    request k is committed (`duge.progress` saves a checkpoint there); `resume` holds what such
    checkpoints recorded for requests 0..k-1, and the run continues at request k with the same
    committed deltas and replay caches, so it ends with the same weights as an uninterrupted run.
    `erased_before`: names of concepts an earlier run erased from this model (`duge.results.erased_in_manifest`;
    on the built-in world every other name of each counts too), erased before request 0 in every setting: the
    pooled teachers never take θ0 for a related prompt naming one, and the penalty and projection keep
    their prompts' outputs edited (`duge.preservation`), as for an earlier request's target.
    """
    config.validate()
    check_batch(config.batch_size)
    if resume is not None and config.setting == "simultaneous":
        raise DugeError("a simultaneous run is one optimisation over every request and cannot be resumed; "
                        "start it again")
    method = get_method(config.method)
    before = names_keys(erased_before, builtin_world=any(r.kind is not None for r in requests))
    results: list[RequestResult] = list(resume.results) if resume is not None else []
    torch.manual_seed(config.seed)
    with interrupt_as_cancel(), RunMemory(backend, method, config) as memory, \
            backend.edits(trainable_pattern(config.trainable), mode=config.trainable_mode, rank=config.trainable_rank) as edits:
        kind = method.regularizer_kind(config.regularizer)
        fisher = run_fisher(backend, edits, requests, general_prompts, config) if kind == "fisher" else None
        if start_deltas:
            edits.load_committed(start_deltas)
        if resume is not None:
            start_index = resume.restore(edits, config.setting)
        phases = current_phases(phases)
        run = Run(backend, edits, method, config, fisher, memory, cancel, progress, phases)
        pooled = method.pooled_teachers and config.teacher_pool > 0
        erasing = config.output_erasure_rank  # rank of duge.output_erasure's directions per request; 0: off

        if config.setting == "simultaneous":
            t0 = time.time()
            with edits.reference():
                caches = [load_or_build_request_cache(backend, r, config, request_seed(config, k), image_filter, phases)
                          for k, r in enumerate(requests)]
            steps = sum(r.steps or config.steps for r in requests)
            moments = preservation_moments(backend, edits, requests, [], requests, general_prompts, kind, before)
            erased = erased_keys(requests, before)
            start = edits.committed() if erasing else None
            directions = [request_directions(backend, edits, requests, [], requests, general_prompts, erasing,
                                             config.output_erasure_epsilon, before, same_moment(moments))] if erasing else []
            delta, losses, _ = train_request(run, caches, steps, config.learning_rate, config.seed, "all requests",
                                             moments=moments, pools=[] if pooled else None, erased=erased)
            if erasing:  # the targets' output directions, removed for every input (duge.output_erasure)
                delta = remove_directions(edits, directions, start)
            seconds = time.time() - t0
            metrics = evaluate(backend, requests) if evaluate else {}
            results.append(RequestResult(", ".join(r.target for r in requests), delta, seconds, steps, losses, metrics))
        else:
            caches: list[RequestCache] = list(resume.caches) if resume is not None else []
            pools: list[TeacherPool] | None = [] if pooled else None
            directions = []  # each sequential request's output directions (duge.output_erasure)
            for k, request in enumerate(requests):
                if k < start_index:
                    continue
                check_cancel(cancel)
                t0 = time.time()
                if config.setting == "independent":  # each request from the model as the run found it
                    edits.reset()
                    if start_deltas:
                        edits.load_committed(start_deltas)
                seed = request_seed(config, k, request.seed)
                with edits.reference():
                    cache = load_or_build_request_cache(backend, request, config, seed, image_filter, phases)
                sequential = config.setting == "sequential"
                replays = sequential and (config.replay_batch_size > 0 or method.resolve_from_original)
                replayed = replayed_caches(caches, requests, k) if replays else []
                earlier = requests[:k] if sequential else []
                if pooled and len(pools) < k and sequential:  # resumed: the earlier requests' pools, as they were
                    # the memory choice settled as request 0 settled it uninterrupted: its parameters, the same rows
                    first_params = edits.start_request(request_seed(config, 0, requests[0].seed))
                    micro_batch_size = run.memory.step_micro_batch_size(first_params, caches[0])
                    edits.discard_request()
                    pools = rebuild_pools(backend, edits, method, config, requests, caches, [r.delta for r in results],
                                          micro_batch_size, before, phases)
                moments = preservation_moments(backend, edits, [request], earlier, requests, general_prompts, kind, before)
                erased = erased_keys([*earlier, request], before)
                start = edits.committed() if erasing else None
                if erasing:
                    if sequential and len(directions) < k:  # resumed: the earlier requests' directions, as they were
                        directions = directions_so_far(backend, edits, requests, [r.delta for r in results],
                                                       general_prompts, erasing, config.output_erasure_epsilon, before)
                    directions = (directions if sequential else []) + [request_directions(
                        backend, edits, [request], earlier, requests, general_prompts, erasing,
                        config.output_erasure_epsilon, before, same_moment(moments))]
                delta, losses, adversarial = train_request(run, replayed + [cache], request.steps or config.steps,
                                                       request.learning_rate or config.learning_rate, seed,
                                                       request.target, replay=bool(replayed), moments=moments,
                                                       pools=(pools if sequential else []) if pooled else None,
                                                       erased=erased)
                if erasing:  # its target's output directions (and the earlier requests'), removed for every input
                    delta = remove_directions(edits, directions, start)
                caches.append(cache)
                seconds = time.time() - t0  # caching and training; the measurement is not the request's cost
                metrics = evaluate(backend, requests[: k + 1]) if evaluate else {}
                metrics["dropped_anchor_images"] = cache.dropped_anchor_images
                results.append(RequestResult(request.target, delta, seconds, request.steps or config.steps, losses, metrics,
                                             adversarial))
                if on_request_done is not None:
                    on_request_done(k, results[-1], cache)
            if config.setting == "independent":  # the run's starting deltas (a continued session's) and every request's
                edits.load_committed({name: sum((r.delta[name] for r in results),
                                                start_deltas[name].float() if start_deltas else 0)
                                      for name in edits.deltas})
        total = edits.committed()
    return UnlearnResult(config, results, total)

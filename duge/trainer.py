"""The continual unlearning loop: `unlearn` runs a concept set's requests in one of three settings.

sequential (the default): each request starts from the last result; independent: each from θ0,
the results merged at the end; simultaneous: all requests in one optimisation. Per request the
reference model generates the images the losses need (`duge.image_cache`), then `train_request`
optimises the trainable deltas on the cross-attention K/V with the method's objective
(`duge.objective`: L = L_xattn + λ_prior · L_prior + λ_reg · L_reg, design doc §2).

The frozen reference ε_φ of request k is the model as request k−1 left it (θ0 plus the deltas
already committed; θ0 itself for the first request and in the independent setting). Taking θ0
instead would make later requests teach erased concepts back: a colour request's templates and
related concepts ("a orange circle") would be denoised by a reference that still draws circles.
The regulariser still anchors to θ0, which is what keeps erosion from accumulating.

The host model is never changed: edits are deltas removed when the run ends, so an error, Ctrl-C
or a cancel callback leaves the host bit-identical and returns nothing (`duge.harness`).
`on_request_done` sees each finished request (`duge.progress` checkpoints it) and `resume`
continues from such checkpoints with the same result as a run never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .concepts import ConceptSet, apply_continual_rule, render_prompt, resolve_request
from .config import FISHER_SEED_OFFSET, UnlearnConfig, request_seed
from .distributed import check_batch, shard_rows
from .edits import trainable_pattern
from .errors import DugeError
from .fisher import estimate_fisher
from .harness import RequestRollback, TrainingDiverged, UnlearnCancelled, check_cancel, interrupt_as_cancel
from .image_cache import RequestCache, load_or_build_request_cache
from .memory import RunMemory
from .methods import Method, get_method
from .objective import step_terms
from .results import ProgressFn, RequestDoneFn, RequestResult, ResumeState, UnlearnResult
from .uce import uce_delta

__all__ = ["unlearn", "train_request", "UnlearnConfig", "UnlearnCancelled", "TrainingDiverged"]


@dataclass(frozen=True)
class Run:
    """What every request of a run shares."""

    backend: object
    edits: object
    method: Method
    config: UnlearnConfig
    fisher: dict | None  # name → diagonal Fisher [out, in] (regularizer "fisher"), else None
    memory: RunMemory
    cancel: Callable[[], bool] | None
    progress: ProgressFn | None


def train_request(run: Run, caches: list[RequestCache], steps: int, learning_rate: float, seed: int, label: str,
                  replay: bool = False) -> tuple[dict, dict]:
    """Optimise one request (the last of `caches`; the earlier ones replayed when `replay`, all alike when
    simultaneous) and commit it. Returns its ΔW per layer and the last step's loss terms."""
    edits, config = run.edits, run.config
    rollback = RequestRollback(edits, label)
    if run.method.objective == "closed_form":
        delta = uce_delta(run.backend, edits, [c.request for c in caches], config)
        before = rollback.before
        edits.load_committed({name: before[name] + delta[name].to(before[name]) for name in before})
        return delta, {}
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    params = edits.start_request(seed)
    rows = shard_rows(config.batch_size + (config.replay_batch_size if config.setting == "sequential" else 0))
    micro_batch_size = run.memory.micro_batch_size(params, caches[-1], rows.stop - rows.start)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    losses = {}
    for step in range(steps):
        check_cancel(run.cancel)
        optimizer.zero_grad(set_to_none=True)
        losses = step_terms(run.backend, edits, caches, run.method, config, rng, generator, run.fisher,
                            replay=config.replay_batch_size if len(caches) > 1 and replay else 0,
                            micro_batch_size=micro_batch_size)
        rollback.step(optimizer, params, losses["total"], step)
        if run.progress:
            run.progress({"request": label, "step": step + 1, "steps": steps, "losses": losses})
    return rollback.commit(), losses


def unlearn(backend, concept_set: ConceptSet, config: UnlearnConfig, builtin_world: bool = False,
            image_filter=None, evaluate=None, progress: ProgressFn | None = None,
            cancel: Callable[[], bool] | None = None, start_deltas: dict[str, torch.Tensor] | None = None,
            start_index: int = 0, resume: ResumeState | None = None,
            on_request_done: RequestDoneFn | None = None) -> UnlearnResult:
    """Erase the concept set's requests from the backend's model, in order.

    `evaluate(backend, requests_so_far) -> dict` is called after each request with the edits
    enabled (the current model). `progress(info)` receives step-level information. Raises
    UnlearnCancelled if `cancel()` returns True or on KeyboardInterrupt; the host is unchanged.
    `start_deltas` are deltas already on the model before request 0 (a continued ComfyUI session);
    `start_index` skips the first requests. `on_request_done(k, result, cache)` is called after
    request k is committed (`duge.progress` saves a checkpoint there); `resume` holds what such
    checkpoints recorded for requests 0..k-1, and the run continues at request k with the same
    committed deltas and replay caches, so it ends with the same weights as an uninterrupted run.
    """
    config.validate()
    check_batch(config.batch_size)
    if resume is not None and config.setting == "simultaneous":
        raise DugeError("a simultaneous run is one optimisation over every request and cannot be resumed; "
                        "start it again")
    method = get_method(config.method)
    requests = apply_continual_rule([resolve_request(r, builtin_world=builtin_world) for r in concept_set.requests],
                                    config.setting)
    specs = concept_set.requests
    results: list[RequestResult] = list(resume.results) if resume is not None else []
    torch.manual_seed(config.seed)
    with interrupt_as_cancel(), RunMemory(backend, method, config) as memory, \
            backend.edits(trainable_pattern(config.trainable), mode=config.trainable_mode, rank=config.trainable_rank) as edits:
        fisher = None
        if config.regularizer == "fisher":
            prompts = list(concept_set.general_prompts) or [render_prompt(r.templates[0], r.anchor) for r in requests]
            fisher = estimate_fisher(backend, edits, prompts[: config.fisher_samples], config,
                                     config.seed + FISHER_SEED_OFFSET)
        if start_deltas:
            edits.load_committed(start_deltas)
        if resume is not None:
            start_index = len(resume.results)
            if config.setting == "sequential":
                for done in resume.results:  # the same float32 additions as commit_request made
                    edits.add_committed(done.delta)
        run = Run(backend, edits, method, config, fisher, memory, cancel, progress)

        if config.setting == "simultaneous":
            t0 = time.time()
            with edits.reference():
                caches = [load_or_build_request_cache(backend, r, config, request_seed(config, k), image_filter)
                          for k, r in enumerate(requests)]
            steps = sum(spec.steps or config.steps for spec in specs)
            delta, losses = train_request(run, caches, steps, config.learning_rate, config.seed, "all requests")
            metrics = evaluate(backend, requests) if evaluate else {}
            results.append(RequestResult(", ".join(r.target for r in requests), delta, time.time() - t0,
                                         steps, losses, metrics))
        else:
            caches: list[RequestCache] = list(resume.caches) if resume is not None else []
            for k, (request, spec) in enumerate(zip(requests, specs)):
                if k < start_index:
                    continue
                check_cancel(cancel)
                t0 = time.time()
                if config.setting == "independent":
                    edits.reset()
                seed = request_seed(config, k, spec.seed)
                with edits.reference():
                    cache = load_or_build_request_cache(backend, request, config, seed, image_filter)
                replayed = caches if config.setting == "sequential" and config.replay_batch_size > 0 else []
                delta, losses = train_request(run, replayed + [cache], spec.steps or config.steps,
                                              spec.learning_rate or config.learning_rate, seed, request.target,
                                              replay=bool(replayed))
                caches.append(cache)
                metrics = evaluate(backend, requests[: k + 1]) if evaluate else {}
                metrics["dropped_anchor_images"] = cache.dropped_anchor_images
                results.append(RequestResult(request.target, delta, time.time() - t0, spec.steps or config.steps,
                                             losses, metrics))
                if on_request_done is not None:
                    on_request_done(k, results[-1], cache)
            if config.setting == "independent":
                edits.load_committed({name: sum(r.delta[name] for r in results) for name in edits.deltas})
        total = edits.committed()
    return UnlearnResult(config, results, total)

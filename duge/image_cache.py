"""The images the frozen model generates for a request (`RequestCache`), kept on disk between runs.

`build_request_cache` generates them: the anchor images (devoid of the target), the related
concepts' images to preserve, and for esd-x the target's own images. Generating a request's anchor
and related images takes `anchor_images + related_images · preserved` sampler runs — on a large
model the most expensive part of a short request. With `image_cache_dir` set, the latents are stored
as `<key>.safetensors` and reused by a later run with the same key, in either host.

The key is a SHA-256 of everything the images depend on: the request (target, aliases, anchor,
preserve, templates), the image settings (counts, sampler steps, guidance, seed, method objective,
whether an image filter ran) and `Backend.fingerprint()`: the reference model as it computes now
(a strided sample of at most 4096 values of every UNet tensor, the committed deltas of earlier
requests included) and the size of the images the backend generates.

A later request replays the earlier requests' caches (`replayed_caches`) without the related images
of concepts erased since (`without_related`, the continual rule).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .backends.base import Backend
from .concepts import ResolvedRequest, preserved_at, render_prompt
from .config import RELATED_IMAGES_SEED_OFFSET, TARGET_IMAGES_SEED_OFFSET, UnlearnConfig
from .distributed import is_main_process
from .errors import DugeError
from .methods import get_method
from .paths import atomic_write
from .phases import Phases, current_phases

logger = logging.getLogger(__name__)
SAMPLE_BATCH_SIZE = 16  # images per sampler call (classifier-free guidance doubles the UNet's batch)
BUILTIN_SAMPLE_BATCH_SIZE = 64  # the same on the built-in model: its 16x16 latents are small, and fewer calls cost less


@dataclass
class RequestCache:
    """What the reference model generated for one request. Latents [N, C, h, w] as the UNet sees them."""

    request: ResolvedRequest
    anchor_latents: torch.Tensor
    anchor_templates: list[int]  # template index of each anchor latent
    related_latents: torch.Tensor
    related_prompts: list[str]
    dropped_anchor_images: int = 0
    target_latents: torch.Tensor | None = None  # images of the target itself (esd-x only), one per anchor template
    related_concepts: list[str] = field(default_factory=list)  # the preserved concept of each related latent


def replayed_caches(caches: list[RequestCache], requests: list[ResolvedRequest], k: int) -> list[RequestCache]:
    """The earlier requests' `caches` as request k replays them: each preserving what the continual rule
    (`duge.concepts.preserved_at`) leaves it at request k."""
    kept = preserved_at(requests, k)
    return [without_related(cache, kept[j]) for j, cache in enumerate(caches)]


def without_related(cache: RequestCache, kept: list[str]) -> RequestCache:
    """`cache` as a request that preserves only `kept` (`duge.concepts.preserved_at`): its related images of
    any other concept left out, so that a concept erased since is no longer replayed."""
    if len(cache.related_concepts) != len(cache.related_prompts):
        raise DugeError(f"request '{cache.request.target}': the cached related images do not say which concept "
                        "each shows; build the request's images again (clear the image cache)")
    rows = [i for i, concept in enumerate(cache.related_concepts) if concept in kept]
    if len(rows) == len(cache.related_concepts) and list(cache.request.preserve) == list(kept):
        return cache
    return replace(cache, request=replace(cache.request, preserve=list(kept)),
                   related_latents=cache.related_latents[rows], related_prompts=[cache.related_prompts[i] for i in rows],
                   related_concepts=[cache.related_concepts[i] for i in rows])


def build_request_cache(backend: Backend, request: ResolvedRequest, config: UnlearnConfig, seed: int,
                        image_filter=None, phases: Phases | None = None) -> RequestCache:
    """Generate the anchor and related images with the reference model (the caller chooses it).

    `image_filter(latents, request) -> keep mask [N] bool` may drop anchor images that still show
    the target (the built-in evaluator does this); at least a quarter are always kept. The
    anchor, related (and, for esd-x, target) images are generated in one batch, each from its own
    seed, and counted on `phases` (a phase "images for '<target>'") sampler step by sampler step.
    """
    objective = get_method(config.method).objective
    if objective == "closed_form":  # UCE needs no images
        return RequestCache(request, torch.zeros(0), [], torch.zeros(0), [])
    n = config.anchor_images
    template_ids = [i % len(request.templates) for i in range(n)]
    prompts = [render_prompt(request.templates[i], request.anchor) for i in template_ids]
    seeds = [seed + i for i in range(n)]
    related_prompts, related_concepts = [], []
    for j, concept in enumerate(request.preserve):
        for i in range(config.related_images):
            related_prompts.append(render_prompt(request.templates[(i + j) % len(request.templates)], concept))
            related_concepts.append(concept)
    prompts += related_prompts
    seeds += [seed + RELATED_IMAGES_SEED_OFFSET + i for i in range(len(related_prompts))]
    if objective == "negative_guidance":
        prompts += [render_prompt(request.templates[i % len(request.templates)], request.target) for i in range(n)]
        seeds += [seed + TARGET_IMAGES_SEED_OFFSET + i for i in range(n)]
    phases = current_phases(phases)
    with phases.phase(f"images for '{request.target}'", len(prompts), "image", "images", target=request.target):
        latents = sample_with_progress(backend, prompts, seeds, config.sampler_steps, config.sampler_guidance, phases)
    anchor, related = latents[:n], latents[n : n + len(related_prompts)]
    target = latents[n + len(related_prompts):] if objective == "negative_guidance" else None
    dropped = 0
    if image_filter is not None:
        keep = image_filter(anchor, request)
        if int(keep.sum()) >= max(1, n // 4):
            dropped = int((~keep).sum())
            anchor = anchor[keep]
            template_ids = [t for t, k in zip(template_ids, keep.tolist()) if k]
    return RequestCache(request, anchor, template_ids, related, related_prompts, dropped, target, related_concepts)


def sample_with_progress(backend: Backend, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                         phases: Phases, decode: bool = False, batch_size: int = SAMPLE_BATCH_SIZE) -> torch.Tensor:
    """Latents [N, C, h, w] of `prompts` (image i from `seeds[i]`), or with `decode` images [N, 3, H, W], in
    batches of `batch_size`; each sampler step is counted on `phases` as its share of the batch's images,
    and each batch's first latent (or image) is passed on as a preview."""
    out = []
    make = backend.generate if decode else backend.sample_latents
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        made = make(batch, seeds[start : start + batch_size], steps, guidance,
                    on_step=lambda n=len(batch): phases.advance(n / steps))
        phases.advance(0, **({"image": made[0]} if decode else {"latents": made[:1]}))
        out.append(made)
    return torch.cat(out) if out else torch.zeros(0)


def cache_key(backend: Backend, request: ResolvedRequest, config: UnlearnConfig, seed: int, filtered: bool) -> str:
    description = {
        "request": {"target": request.target, "aliases": list(request.aliases), "anchor": request.anchor,
                    "preserve": list(request.preserve), "templates": list(request.templates)},
        "images": {"anchor": config.anchor_images, "related": config.related_images, "steps": config.sampler_steps,
                   "guidance": config.sampler_guidance, "seed": seed, "filtered": filtered,
                   "objective": get_method(config.method).objective},
        "model": backend.fingerprint(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def load_or_build_request_cache(backend: Backend, request: ResolvedRequest, config: UnlearnConfig, seed: int,
                                image_filter=None, phases: Phases | None = None) -> RequestCache:
    """`build_request_cache`, through the on-disk cache when `config.image_cache_dir` is set."""
    if not config.image_cache_dir:
        return build_request_cache(backend, request, config, seed, image_filter, phases)
    path = Path(config.image_cache_dir).expanduser() / f"{cache_key(backend, request, config, seed, image_filter is not None)}.safetensors"
    if path.exists():
        tensors = load_file(str(path), device=str(backend.device))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["duge_request_cache"])
        logger.info("request '%s': cached images read from %s", request.target, path)
        return RequestCache(request, tensors["anchor"], meta["anchor_templates"], tensors["related"],
                            meta["related_prompts"], meta["dropped_anchor_images"], tensors.get("target"),
                            meta.get("related_concepts", []))
    cache = build_request_cache(backend, request, config, seed, image_filter, phases)
    if is_main_process():
        tensors = {"anchor": cache.anchor_latents.contiguous().cpu(), "related": cache.related_latents.contiguous().cpu()}
        if cache.target_latents is not None:
            tensors["target"] = cache.target_latents.contiguous().cpu()
        meta = {"duge_request_cache": json.dumps({"anchor_templates": list(cache.anchor_templates),
                                                  "related_prompts": list(cache.related_prompts),
                                                  "related_concepts": list(cache.related_concepts),
                                                  "dropped_anchor_images": cache.dropped_anchor_images})}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=True)
        logger.info("request '%s': cached images written to %s", request.target, path)
    return cache

"""Cached anchor/related images of a request on disk (`UnlearnConfig.cache_dir`).

Generating a request's anchor and related images takes `anchor_images + related_images · preserved`
sampler runs — on a large model the most expensive part of a short request. With `cache_dir` set,
the latents are stored as `<key>.safetensors` and reused by a later run with the same key.

The key is a SHA-256 of everything the images depend on: the request (target, aliases, anchor,
preserve, templates), the image settings (counts, sampler steps, guidance, seed, method objective,
whether an image filter ran) and a fingerprint of the reference model (every UNet parameter's name
and shape, and a strided sample of at most 4096 values of each — the edited layers' committed
deltas included, i.e. the model as the earlier requests left it). The fingerprint samples values
rather than hashing every byte, which would take seconds per request on SDXL.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .distributed import is_main_process
from .paths import atomic_write

logger = logging.getLogger(__name__)
SAMPLED_VALUES = 4096


@torch.no_grad()
def model_fingerprint(unet: torch.nn.Module) -> str:
    """SHA-256 over each state-dict tensor's name, shape and a strided sample of its values (module doc).

    With DUGE's edits installed the state dict holds W0 (`...parametrizations.weight.original`) and the
    committed deltas (`...parametrizations.weight.0.committed`): the reference model's weights."""
    digest = hashlib.sha256()
    for key, value in sorted(unet.state_dict().items()):
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)].float().cpu().contiguous()
        digest.update(f"{key}\0{list(value.shape)}\0".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def cache_key(backend, request, config, seed: int, filtered: bool) -> str:
    from .methods import get_method

    description = {
        "request": {"target": request.target, "aliases": list(request.aliases), "anchor": request.anchor,
                    "preserve": list(request.preserve), "templates": list(request.templates)},
        "images": {"anchor": config.anchor_images, "related": config.related_images, "steps": config.cache_steps,
                   "guidance": config.cache_guidance, "seed": seed, "filtered": filtered,
                   "objective": get_method(config.method).objective,
                   "preserve_anchor": bool(getattr(config, "preserve_anchor", False)),
                   "resolution": getattr(backend, "resolution", None)},
        "model": model_fingerprint(backend.unet),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def load_or_build_request_cache(backend, request, config, seed: int, image_filter=None):
    """`trainer.build_request_cache`, through the on-disk cache when `config.cache_dir` is set."""
    from .trainer import RequestCache, build_request_cache

    if not getattr(config, "cache_dir", None) or not hasattr(backend, "unet"):
        return build_request_cache(backend, request, config, seed, image_filter)
    path = Path(config.cache_dir).expanduser() / f"{cache_key(backend, request, config, seed, image_filter is not None)}.safetensors"
    if path.exists():
        tensors = load_file(str(path), device=str(backend.device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["duge_request_cache"])
        logger.info("request '%s': cached images read from %s", request.target, path)
        return RequestCache(request, tensors["anchor"], meta["anchor_templates"], tensors["related"],
                            meta["related_prompts"], meta["dropped_anchor_images"], tensors.get("target"))
    cache = build_request_cache(backend, request, config, seed, image_filter)
    if is_main_process():
        tensors = {"anchor": cache.anchor_latents.contiguous().cpu(), "related": cache.related_latents.contiguous().cpu()}
        if cache.target_latents is not None:
            tensors["target"] = cache.target_latents.contiguous().cpu()
        meta = {"duge_request_cache": json.dumps({"anchor_templates": list(cache.anchor_templates),
                                                  "related_prompts": list(cache.related_prompts),
                                                  "dropped_anchor_images": cache.dropped_anchor_images})}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=True)
        logger.info("request '%s': cached images written to %s", request.target, path)
    return cache

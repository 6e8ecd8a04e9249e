"""The diagonal Fisher estimate that weights the regulariser when `UnlearnConfig.regularizer` is "fisher" (EWC):
`estimate_fisher` on given prompts, `run_fisher` on a run's prompts and seed."""

from __future__ import annotations

import torch

from .backends.base import Backend
from .concepts import ResolvedRequest, render_prompt
from .config import FISHER_SEED_OFFSET, UnlearnConfig
from .edits import LayerEdits


def estimate_fisher(backend: Backend, edits: LayerEdits, prompts: list[str], config: UnlearnConfig,
                    seed: int) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable weights at the current model: the mean squared gradient of
    the denoising loss on images generated from `prompts`, normalised to mean 1 (so λ_reg keeps
    the scale it has with L2-SP). Returns name → F [out, in] per edited layer."""
    generator = torch.Generator().manual_seed(seed)
    committed = [d.committed for d in edits.deltas.values()]
    fisher = {name: torch.zeros_like(d.committed) for name, d in edits.deltas.items()}
    latents = backend.sample_latents(prompts, seed, config.sampler_steps, config.sampler_guidance)
    ctx = backend.encode_prompts(prompts)
    for c in committed:
        c.requires_grad_(True)
    try:
        for i in range(len(prompts)):
            noise = torch.randn(latents[i : i + 1].shape, generator=generator).to(backend.device)
            t = torch.randint(0, backend.num_train_timesteps, (1,), generator=generator).to(backend.device)
            zt = backend.add_noise(latents[i : i + 1], noise, t)
            loss = torch.nn.functional.mse_loss(backend.predict_noise(zt, t, ctx[i : i + 1]), noise)
            grads = torch.autograd.grad(loss, committed, allow_unused=True)
            for name, g in zip(edits.deltas, grads):
                if g is not None:
                    fisher[name] += g.detach() ** 2 / len(prompts)
    finally:
        for c in committed:
            c.requires_grad_(False)
    mean = torch.stack([f.mean() for f in fisher.values()]).mean().clamp(min=1e-20)
    return {name: f / mean for name, f in fisher.items()}


def run_fisher(backend: Backend, edits: LayerEdits, requests: list[ResolvedRequest], general_prompts: list[str],
               config: UnlearnConfig) -> dict[str, torch.Tensor]:
    """A run's Fisher estimate, at the model as the run starts: on the first `config.fisher_samples` of the
    concept set's `general_prompts` (default: each request's first template with its anchor), seed
    `config.seed + FISHER_SEED_OFFSET`."""
    prompts = list(general_prompts) or [render_prompt(r.templates[0], r.anchor) for r in requests]
    return estimate_fisher(backend, edits, prompts[: config.fisher_samples], config, config.seed + FISHER_SEED_OFFSET)

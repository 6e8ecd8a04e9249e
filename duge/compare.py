"""Side-by-side comparisons of models on the same prompts and seeds, and the text reports beside them.

`comparison_grid` lays out one row per (model, prompt) with the same seeds in every row, so a
column shows what each model makes of the same starting noise. `world_scores` reads the images
of the built-in world with its evaluator: for each concept a prompt names, the share of images
the evaluator reads as that concept. `unlearn_report` is the text a run reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .errors import DugeError
from .grids import labelled_grid, to_pil
from .world.vocabulary import concept_by_name

GenerateFn = Callable[[list[str], int], torch.Tensor]  # (prompts, seed) -> images [B, 3, H, W] in [0, 1]


def parse_prompts(text: str) -> list[str]:
    """Non-empty lines of a multi-line prompt field."""
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise DugeError("prompts: expected at least one prompt, one per line")
    return prompts


@dataclass
class Comparison:
    """images[m][p]: [n, 3, H, W] for model m and prompt p; labels: one per model."""

    labels: list[str]
    prompts: list[str]
    seed: int
    images: list[list[torch.Tensor]]


def compare_models(models: list[tuple[str, GenerateFn]], prompts: list[str], images_per_prompt: int,
                   seed: int) -> Comparison:
    """Generate `images_per_prompt` images per prompt with every model; image i uses seed `seed + i` everywhere."""
    if images_per_prompt < 1:
        raise DugeError(f"images per prompt must be at least 1, got {images_per_prompt}")
    images = [[generate([prompt] * images_per_prompt, seed) for prompt in prompts] for _, generate in models]
    return Comparison([label for label, _ in models], list(prompts), seed, images)


def comparison_grid(comparison: Comparison, cell: int = 128) -> Image.Image:
    """One labelled row per (prompt, model): "before · a red circle"; columns are the seeds."""
    rows, labels = [], []
    for p, prompt in enumerate(comparison.prompts):
        for m, label in enumerate(comparison.labels):
            rows.append([to_pil(image) for image in comparison.images[m][p]])
            labels.append(f"{label} · {prompt}")
    n = max(len(r) for r in rows)
    return labelled_grid(rows, labels, cell=cell, column_labels=[f"seed {comparison.seed + i}" for i in range(n)])


def prompt_concepts(prompt: str) -> list:
    """The built-in world's concepts named in `prompt` (world words only; others ignored)."""
    found = []
    for word in prompt.lower().replace(",", " ").split():
        try:
            concept = concept_by_name(word)
        except KeyError:
            continue
        if concept not in found:
            found.append(concept)
    return found


def world_scores(comparison: Comparison, evaluator) -> tuple[dict, str]:
    """For each model, prompt and concept the prompt names: the share of images the evaluator reads
    as that concept. Returns (scores[label][prompt][concept] -> fraction, a readable text)."""
    scores: dict = {}
    lines = []
    for m, label in enumerate(comparison.labels):
        scores[label] = {}
        for p, prompt in enumerate(comparison.prompts):
            images = comparison.images[m][p]
            predicted = evaluator.predict(images)
            per_concept = {}
            for concept in prompt_concepts(prompt):
                hits = sum(name == concept.name for name in predicted[concept.kind])
                per_concept[concept.name] = hits / len(images)
            scores[label][prompt] = per_concept
            shown = ", ".join(f"{name} {value:.0%}" for name, value in per_concept.items()) or "no world concept named"
            lines.append(f"{label} · {prompt}: {shown}")
    text = "Evaluator: share of images read as each concept the prompt names\n" + "\n".join(lines)
    return scores, text


def unlearn_report(result, concept_set_name: str, builtin_world: bool, notes: list[str] | None = None) -> str:
    """A readable summary of an `UnlearnResult`: per request its steps, time, final losses and metrics."""
    config = result.config
    lines = [f"DUGE unlearning of '{concept_set_name}' — method {getattr(config, 'method', 'duge')}, "
             f"setting {config.setting}, trainable {config.trainable}"
             + (" (built-in world)" if builtin_world else "")]
    for k, request in enumerate(result.requests, start=1):
        losses = ", ".join(f"{name} {value:.4g}" for name, value in request.final_losses.items())
        lines.append(f"{k}. erase '{request.target}': {request.steps} steps in {request.seconds:.1f} s; final losses: {losses}")
        metrics = {key: request.metrics[key] for key in ("UA", "IRA", "CRA") if request.metrics.get(key) is not None}
        if metrics:
            lines.append("   " + ", ".join(f"{key} {value:.2f}" for key, value in metrics.items()))
    for note in notes or []:
        lines.append(note)
    return "\n".join(lines)

"""Erasure and retention metrics (design doc §6) over a classifier interface.

A classifier maps images [B, 3, H, W] in [0, 1] to predicted concept names per kind; the
built-in world's evaluator is one. Definitions, for the requests erased so far:

- UA (unlearning accuracy): over every erased concept, the share of images prompted with it —
  under each of its names and several paraphrasing templates — that the classifier does NOT
  read as that concept. Averaged over erased concepts.
- acc(c): for a concept c not erased, the share of images prompted with c alone that the
  classifier reads as c.
- IRA (in-domain retention): for each request, the mean acc over the non-erased concepts of the
  target's kind; averaged over requests.
- CRA (cross-domain retention): the same over the non-erased concepts of the other kinds.
All are fractions in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from .concepts import ResolvedRequest, render_prompt


class ConceptClassifier(Protocol):
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Predicted canonical concept name per kind for each image."""


# Paraphrasing templates for UA, per kind (distinct from the training templates).
PARAPHRASE_TEMPLATES = {
    "object": ["a {}", "an image of a green {}", "the {} is checkered"],
    "colour": ["a {} shape", "a picture of a {} heart", "the star is {} and striped"],
    "style": ["a {} shape", "an image of a {} square", "the circle is pink and {}"],
}


@dataclass
class WorldConcept:
    name: str
    kind: str
    names: tuple[str, ...]


def world_concepts() -> list[WorldConcept]:
    from .world.vocabulary import CONCEPTS

    return [WorldConcept(c.name, c.kind, c.names) for c in CONCEPTS]


def unlearning_metrics(
    generate: Callable[[list[str], int], torch.Tensor],
    classifier: ConceptClassifier,
    erased: list[ResolvedRequest],
    samples_per_prompt: int = 4,
    retention_samples: int = 8,
    seed: int = 0,
) -> dict:
    """UA / IRA / CRA and per-concept numbers for a model of the built-in world.

    `generate(prompts, seed) -> images` samples the model being measured.
    """
    from .world.quality import single_concept_prompt
    from .world.vocabulary import concept_by_name

    concepts = world_concepts()
    erased_names = {concept_by_name(r.target).name for r in erased}
    ua_per_concept = {}
    for r in erased:
        concept = concept_by_name(r.target)
        prompts = [render_prompt(t, name) for t in PARAPHRASE_TEMPLATES[concept.kind] for name in concept.names]
        prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        predicted = classifier.predict(generate(prompts, seed))[concept.kind]
        ua_per_concept[concept.name] = float(np.mean([p != concept.name for p in predicted]))
    accuracy = {}
    for i, concept in enumerate(concepts):
        if concept.name in erased_names:
            continue
        prompts = [single_concept_prompt(concept_by_name(concept.name))] * retention_samples
        predicted = classifier.predict(generate(prompts, seed + 1 + i))[concept.kind]
        accuracy[concept.name] = float(np.mean([p == concept.name for p in predicted]))
    ira, cra = [], []
    for r in erased:
        kind = concept_by_name(r.target).kind
        same = [accuracy[c.name] for c in concepts if c.kind == kind and c.name in accuracy]
        other = [accuracy[c.name] for c in concepts if c.kind != kind and c.name in accuracy]
        if same:
            ira.append(np.mean(same))
        if other:
            cra.append(np.mean(other))
    return {
        "UA": float(np.mean(list(ua_per_concept.values()))) if ua_per_concept else None,
        "IRA": float(np.mean(ira)) if ira else None,
        "CRA": float(np.mean(cra)) if cra else None,
        "UA_per_concept": ua_per_concept,
        "accuracy_per_concept": accuracy,
    }


def retention_ratios(metrics: dict, base: dict) -> dict:
    """IRA and CRA as fractions of the unedited model's values on the same requests."""
    out = {}
    for key in ("IRA", "CRA"):
        if metrics.get(key) is not None and base.get(key):
            out[f"{key}_ratio"] = metrics[key] / base[key]
    return out

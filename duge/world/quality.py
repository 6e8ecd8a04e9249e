"""How well a model of the built-in world follows its prompts, as read by the evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .evaluator import WorldEvaluator
from .vocabulary import COLOURS, CONCEPTS, GENERIC_WORD, OBJECTS, STYLES, Concept


def single_concept_prompt(concept: Concept, name: str | None = None) -> str:
    """A prompt naming only `concept` (by `name`, default its canonical name); other kinds unnamed."""
    word = name or concept.name
    if concept.kind == "object":
        return f"a {word}"
    return f"a {word} {GENERIC_WORD['object']}"


def combination_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """`n` prompts naming an object, a colour and a style: (prompt, object, colour, style), fixed by `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        o, c, s = OBJECTS[rng.integers(8)], COLOURS[rng.integers(8)], STYLES[rng.integers(len(STYLES))]
        out.append((f"a {s.name} {c.name} {o.name}", o.name, c.name, s.name))
    return out


@dataclass
class QualityReport:
    per_concept: dict[str, float] = field(default_factory=dict)  # canonical name -> agreement
    per_kind: dict[str, float] = field(default_factory=dict)  # kind -> mean agreement over its concepts
    combination_all_three: float = 0.0
    combination_per_kind: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def measure_quality(
    generate,  # callable(prompts: list[str], seed: int) -> images [B, 3, H, W] in [0, 1]
    evaluator: WorldEvaluator,
    samples_per_prompt: int = 16,
    n_combinations: int = 24,
    seed: int = 0,
    progress=None,
) -> QualityReport:
    """Sample every single-concept prompt and `n_combinations` three-concept prompts; score with the evaluator."""
    report = QualityReport()
    for i, concept in enumerate(CONCEPTS):
        prompts = [single_concept_prompt(concept)] * samples_per_prompt
        predicted = evaluator.predict(generate(prompts, seed + i))[concept.kind]
        report.per_concept[concept.name] = float(np.mean([p == concept.name for p in predicted]))
        if progress:
            progress()
    for kind in ("object", "colour", "style"):
        values = [report.per_concept[c.name] for c in CONCEPTS if c.kind == kind]
        report.per_kind[kind] = float(np.mean(values))
    hits = {"object": [], "colour": [], "style": [], "all": []}
    for j, (prompt, o, c, s) in enumerate(combination_prompts(n_combinations, seed)):
        pred = evaluator.predict(generate([prompt] * samples_per_prompt, seed + 1000 + j))
        for k in range(samples_per_prompt):
            ok = {"object": pred["object"][k] == o, "colour": pred["colour"][k] == c, "style": pred["style"][k] == s}
            for kind, v in ok.items():
                hits[kind].append(v)
            hits["all"].append(all(ok.values()))
        if progress:
            progress()
    report.combination_all_three = float(np.mean(hits["all"])) if hits["all"] else 0.0
    report.combination_per_kind = {k: float(np.mean(v)) for k, v in hits.items() if k != "all" and v}
    return report

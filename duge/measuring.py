"""When and how a run measures its model: `measuring_mode` reads `UnlearnConfig.eval`, and `measuring`
gives the trainer an `evaluate` callback whose images are counted on the run's progress phases."""

from __future__ import annotations

from collections import defaultdict

import torch

from .backends.base import Backend
from .evaluation import MissingClassifierError, measure_requests, require_classifier
from .phases import Phases, current_phases


def measuring_mode(requested: str, can_measure: bool, model: str = "the model") -> str:
    """When a run measures (`UnlearnConfig.eval`): "each" request, the "final" one, or "none".

    "auto" is "each" when there is something to measure with (the built-in evaluator on the
    built-in world, or a classifier given), else "none"; "each"/"final" without one is an error.
    """
    if requested == "auto":
        return "each" if can_measure else "none"
    if requested != "none" and not can_measure:
        try:
            require_classifier(False, None, model)
        except MissingClassifierError as err:
            raise MissingClassifierError(f"--eval {requested}: {err}") from None
    return requested


def count_images(measure) -> int:
    """How many images `measure(generate, classifier)` generates: it runs once on blank images with a
    classifier that names nothing (the measurements choose their prompts before seeing any image)."""
    counted = [0]

    def generate(prompts, seed):
        counted[0] += len(prompts)
        return torch.zeros(len(prompts), 3, 1, 1)

    class NamesNothing:
        def predict(self, images):
            return defaultdict(lambda: [""] * len(images))

    measure(generate, NamesNothing())
    return counted[0]


def measuring(backend: Backend, classifier, concepts, seed: int, phases: Phases | None = None, steps: int = 20,
              guidance: float = 7.5, with_request_templates: bool = False):
    """`evaluate(backend, requests_so_far, name=None)` for the trainer: cumulative UA/IRA/CRA/H and the
    per-concept numbers (`duge.evaluation.measure_requests`) of the model as it is now, its images
    counted on `phases` sampler step by sampler step, as one "measuring" phase."""
    phases = current_phases(phases)

    def evaluate(_backend: Backend, requests_so_far, name: str | None = None) -> dict:
        def measure(generate, reader):
            return measure_requests(generate, reader, requests_so_far, concepts, seed=seed,
                                    with_request_templates=with_request_templates)

        def generate(prompts, image_seed):
            images = backend.generate(prompts, image_seed, steps, guidance,
                                      on_step=lambda n=len(prompts): phases.advance(n / steps))
            phases.advance(0, image=images[0])
            return images

        with phases.phase(name or f"measuring after '{requests_so_far[-1].target}'", count_images(measure), "image",
                          "measuring"):
            return measure(generate, classifier)

    return evaluate

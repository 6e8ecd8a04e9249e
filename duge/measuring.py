"""When and how a run measures its model: `measuring_mode` reads `UnlearnConfig.eval`, and `measuring`
gives the trainer an `evaluate` callback whose images are counted on the run's progress phases."""

from __future__ import annotations

from collections import defaultdict

import torch

from .backends.base import Backend
from .config import UnlearnConfig
from .errors import DugeError
from .evaluation import MissingClassifierError, measure_requests, require_classifier
from .image_cache import SAMPLE_BATCH_SIZE
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


def planned_calls(measure) -> list[tuple[list[str], int]]:
    """The (prompts, seed) of every `generate` call `measure(generate, classifier)` makes, in order: it runs
    once on blank images with a classifier that names nothing (the measurements choose their prompts before
    seeing any image)."""
    calls = []

    def generate(prompts, seed):
        calls.append((list(prompts), seed))
        return torch.zeros(len(prompts), 3, 1, 1)

    class NamesNothing:
        def predict(self, images):
            return defaultdict(lambda: [""] * len(images))

    measure(generate, NamesNothing())
    return calls


def count_images(measure) -> int:
    """How many images `measure(generate, classifier)` generates (`planned_calls`)."""
    return sum(len(prompts) for prompts, _ in planned_calls(measure))


class PlannedImages:
    """`generate(prompts, seed)` for a measurement whose calls are known (`planned_calls`): the images are
    made ahead in sampler calls of `batch_size`, each image from its own seed (`seed + i` for image i of a
    call, as `Backend.generate` gives it), so a concept's few images share a call with the next concepts'.
    Only the images of the current batch are held. A call other than the plan's next is an error."""

    def __init__(self, make, calls: list[tuple[list[str], int]], batch_size: int):
        self.make = make  # (prompts, seeds) -> images [N, 3, H, W]
        self.calls = list(calls)
        self.prompts = [p for prompts, _ in self.calls for p in prompts]
        self.seeds = [seed + i for prompts, seed in self.calls for i in range(len(prompts))]
        self.batch_size = batch_size
        self.made = torch.zeros(0)  # images made and not yet handed out
        self.next_image = 0  # first image not yet made
        self.next_call = 0

    def __call__(self, prompts, seed) -> torch.Tensor:
        if self.next_call >= len(self.calls) or self.calls[self.next_call] != (list(prompts), seed):
            raise DugeError(f"the measurement asked for {len(prompts)} images of seed {seed} out of the order it "
                               "planned; a measurement must choose its prompts before it sees any image")
        self.next_call += 1
        while len(self.made) < len(prompts):
            stop = min(self.next_image + self.batch_size, len(self.prompts))
            images = self.make(self.prompts[self.next_image : stop], self.seeds[self.next_image : stop])
            self.made = torch.cat([self.made, images]) if len(self.made) else images
            self.next_image = stop
        images, self.made = self.made[: len(prompts)], self.made[len(prompts) :]
        return images


class Measuring:
    """`evaluate(backend, requests_so_far, name=None)` for the trainer (`measuring`). `shown` holds, of the last
    measurement, the first `keep` images [keep, 3, H, W] of each prompt in `keep_prompts`: the very images its
    figures were read from, for a run to show (`duge.run`'s before/after grid)."""

    def __init__(self, backend: Backend, classifier, concepts, seed: int, phases: Phases, steps: int, guidance: float,
                 with_request_templates: bool, batch_size: int, keep_prompts=(), keep: int = 0):
        self.backend, self.classifier, self.concepts, self.seed = backend, classifier, concepts, seed
        self.phases, self.steps, self.guidance = phases, steps, guidance
        self.with_request_templates, self.batch_size = with_request_templates, batch_size
        self.keep_prompts, self.keep = set(keep_prompts), keep
        self.shown: dict[str, torch.Tensor] = {}

    def __call__(self, _backend: Backend, requests_so_far, name: str | None = None) -> dict:
        def measure(generate, reader):
            return measure_requests(generate, reader, requests_so_far, self.concepts, seed=self.seed,
                                    with_request_templates=self.with_request_templates)

        def make(prompts, seeds):
            images = self.backend.generate(prompts, seeds, self.steps, self.guidance,
                                           on_step=lambda n=len(prompts): self.phases.advance(n / self.steps))
            self.phases.advance(0, image=images[0])
            return images

        calls = planned_calls(measure)
        planned = PlannedImages(make, calls, self.batch_size)
        shown: dict[str, list[torch.Tensor]] = {}

        def generate(prompts, seed):
            images = planned(prompts, seed)
            for prompt, image in zip(prompts, images):
                if prompt in self.keep_prompts and len(shown.setdefault(prompt, [])) < self.keep:
                    shown[prompt].append(image)
            return images

        with self.phases.phase(name or f"measuring after '{requests_so_far[-1].target}'",
                               sum(len(prompts) for prompts, _ in calls), "image", "measuring"):
            metrics = measure(generate, self.classifier)
        self.shown = {prompt: torch.stack(images) for prompt, images in shown.items()}
        return metrics


def measuring(backend: Backend, classifier, concepts, seed: int, phases: Phases | None = None,
              steps: int = UnlearnConfig.eval_steps,
              guidance: float = 7.5, with_request_templates: bool = False, batch_size: int = SAMPLE_BATCH_SIZE,
              keep_prompts=(), keep: int = 0) -> Measuring:
    """`evaluate(backend, requests_so_far, name=None)` for the trainer: cumulative UA/IRA/CRA/H and the
    per-concept numbers (`duge.evaluation.measure_requests`) of the model as it is now, its images made in
    sampler calls of `batch_size` across the measurement's prompts (`PlannedImages`) and counted on `phases`
    sampler step by sampler step, as one "measuring" phase. The first `keep` images of each of `keep_prompts`
    are kept in `evaluate.shown` (`Measuring`)."""
    return Measuring(backend, classifier, concepts, seed, current_phases(phases), steps, guidance,
                     with_request_templates, batch_size, keep_prompts, keep)

"""What a run on the built-in world adds to the trainer: its evaluator, which drops anchor images that
still show the target (`anchor_filter`) and measures UA / IRA / CRA after each request (`world_evaluate`)."""

from __future__ import annotations

import torch

from ..backends.base import Backend
from ..config import UnlearnConfig
from ..evaluation import world_measured_concepts
from ..image_cache import BUILTIN_SAMPLE_BATCH_SIZE
from ..measuring import measuring
from ..phases import Phases
from .evaluator import load_evaluator
from .model import EVALUATOR_PATH
from .tokenizer import world_words
from .vocabulary import concept_by_name


def uses_builtin_world(pipe) -> bool:
    """True when the model speaks the built-in world's vocabulary (the built-in model or an edit of it)."""
    vocab = pipe.tokenizer.get_vocab()
    return all(f"{w}</w>" in vocab for w in world_words()) and len(vocab) < 1000


def builtin_evaluator():
    """The built-in world's concept classifier (`duge.world.evaluator`)."""
    return load_evaluator(EVALUATOR_PATH)


def anchor_filter(backend: Backend, evaluator):
    """`image_filter` for the trainer: keep anchor images in which the evaluator does not see the request's target."""

    def keep(latents, request):
        concept = concept_by_name(request.target)
        predicted = evaluator.predict(backend.decode(latents))[concept.kind]
        return torch.tensor([p != concept.name for p in predicted])

    return keep


def world_evaluate(backend: Backend, evaluator, seed: int, steps: int = UnlearnConfig.eval_steps,
                   phases: Phases | None = None):
    """`evaluate` for the trainer: UA / IRA / CRA of the model as it is now, on images of `seed`, with the
    built-in evaluator (`duge.measuring.measuring`; its images counted on `phases`)."""
    return measuring(backend, evaluator, world_measured_concepts(), seed, phases, steps,
                     batch_size=BUILTIN_SAMPLE_BATCH_SIZE)

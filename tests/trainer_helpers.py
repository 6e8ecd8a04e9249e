"""Helpers shared by the trainer tests: a tiny configuration, two requests, and host-weight checks."""

import torch

from duge.concepts import ResolvedRequest, parse_concept_set, resolve_concept_set
from duge.config import UnlearnConfig

# Two requests on the built-in world: an object, then a colour.
CONCEPTS = """
name: short
requests:
  - target: circle
    preserve: [square]
  - target: red
    preserve: [orange]
"""


def tiny_config(**overrides) -> UnlearnConfig:
    """A run of seconds: 3 steps per request, batch 2, two anchor images of 2 sampler steps, teacher pools of 4 rows."""
    config = UnlearnConfig(steps=3, batch_size=2, anchor_images=2, related_images=1, sampler_steps=2, teacher_pool=4)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def requests_of(text: str, setting: str = "sequential") -> list[ResolvedRequest]:
    """A concept set's requests on the built-in world, resolved for `setting` as a run resolves them."""
    return resolve_concept_set(parse_concept_set(text), builtin_world=True, setting=setting)


def host_weights(backend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.unet.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], backend) -> None:
    after = backend.unet.state_dict()
    assert set(after) == set(before), "parametrizations were left on the host UNet"
    assert all(torch.equal(before[k], after[k]) for k in before)

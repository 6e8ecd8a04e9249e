"""Output-space erasure (duge.output_erasure): which directions it removes, and that a run keeps them removed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from duge.backends.diffusers_backend import DiffusersBackend
from duge.config import UnlearnConfig
from duge.errors import DugeError
from duge.output_erasure import directions_so_far, output_directions
from duge.trainer import unlearn

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import CONCEPTS, assert_bit_identical, host_weights, requests_of, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def backend(builtin_pipe):
    return DiffusersBackend(builtin_pipe, device="cpu", dtype="float32")


def test_the_direction_is_where_the_target_differs_and_the_protected_outputs_do_not():
    """With W = I, the target-minus-anchor energy on axes 0 and 1, and the protected states' on axes 0 and 2,
    the removed direction is axis 1 (ε = 0.1); with a huge ε the protection no longer counts and axis 0, where the
    difference is largest, wins."""
    weight = torch.eye(4, dtype=torch.float64)
    difference = torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    protected = torch.diag(torch.tensor([4.0, 0.0, 4.0, 0.0], dtype=torch.float64))
    q = output_directions(weight, difference, protected, rank=1, epsilon=0.1)
    assert q.shape == (4, 1) and torch.allclose(q[:, 0].abs(), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    q0 = output_directions(weight, difference, protected, rank=1, epsilon=1e6)
    assert torch.allclose(q0[:, 0].abs(), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("setting", ["sequential", "independent", "simultaneous"])
def test_no_input_reaches_a_removed_direction_after_the_run(backend, setting):
    """After every request, each request's directions (computed as the run computed them) are outside the range
    of every edited K/V weight: Qᵀ·W = 0 for every input. The host's weights are untouched."""
    requests = requests_of(CONCEPTS, setting)
    before = host_weights(backend)
    config = tiny_config(setting=setting, output_erasure_rank=2)
    result = unlearn(backend, requests, config)
    assert_bit_identical(before, backend)
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        originals = {name: w.detach().double() for name, w in edits.originals.items()}
        if setting == "sequential":
            edits.load_committed(result.total_delta)
            directions = directions_so_far(backend, edits, requests, [r.delta for r in result.requests], [],
                                           config.output_erasure_rank, config.output_erasure_epsilon)
        else:  # from θ0: each request's own (independent), or all at once (simultaneous)
            from duge.output_erasure import request_directions
            groups = [[r] for r in requests] if setting == "independent" else [requests]
            directions = [request_directions(backend, edits, g, [], requests, [], 2, config.output_erasure_epsilon)
                          for g in groups]
    assert len(directions) == (1 if setting == "simultaneous" else len(requests))
    for name, delta in (result.total_delta if setting == "sequential" else result.requests[0].delta).items():
        weight = originals[name] + delta.double()
        q = directions[0][name]
        assert q.shape[1] == 2
        assert float((q.T @ weight).abs().max()) < 1e-4 * float(weight.abs().max()), name
    if setting == "sequential":  # the earlier request's directions stay removed after the later request trained
        for name, delta in result.total_delta.items():
            weight = originals[name] + delta.double()
            for found in directions:
                assert float((found[name].T @ weight).abs().max()) < 1e-4 * float(weight.abs().max()), name


def test_output_erasure_is_refused_for_a_baseline():
    config = UnlearnConfig(method="ca", output_erasure_rank=1)
    with pytest.raises(DugeError, match="output_erasure_rank is a setting of the DUGE method"):
        config.validate()
    with pytest.raises(DugeError, match="output_erasure_rank must be a whole number"):
        UnlearnConfig(output_erasure_rank=-1).validate()

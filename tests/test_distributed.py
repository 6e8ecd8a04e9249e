"""Data parallel through accelerate (duge.distributed): the sharded step's gradients average to the
single-process gradient (in one process, ranks simulated), and — slow — `accelerate launch` with two
CPU processes (gloo) writes the same edit as a single-process run.""" 

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from duge import distributed
from duge.backends.diffusers_backend import DiffusersBackend
from duge.concepts import parse_concept_set, resolve_request
from duge.config import UnlearnConfig
from duge.image_cache import build_request_cache
from duge.methods import get_method
from duge.objective import step_terms

SET = "name: t\nrequests:\n  - target: circle\n    preserve: [square, heart]\n"


@pytest.mark.parametrize("count, world", [(8, 2), (7, 2), (5, 3), (2, 2)])
def test_shards_cover_the_batch_once_and_weights_average_to_one(monkeypatch, count, world):
    rows, weights = [], []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, world))
        part = distributed.shard_rows(count)
        rows += list(range(count))[part]
        weights.append(distributed.shard_weight(part, count))
    assert rows == list(range(count))
    # Losses that are means over each shard, times w_r, average over the processes to the batch mean:
    # (1/world) Σ_r w_r · S_r / n_r = Σ_r S_r / count  ⇔  w_r = n_r · world / count, so (1/world) Σ_r w_r = 1.
    assert sum(weights) / world == pytest.approx(1.0)


@pytest.mark.parametrize("micro_batch_size", [0, 1, 2])
def test_sharded_gradients_match_when_some_rows_have_no_anchor_tokens(builtin_pipe, monkeypatch, micro_batch_size):
    """Replayed "circle" rows (anchor "shape") beside "red" rows (empty anchor, no attention term): the
    attention term is a mean over fewer rows than the output term, and still shards exactly — also
    when each process's rows go through the UNet one or two at a time (micro-batches, gradients
    accumulated), and then in one process too."""
    backend = DiffusersBackend(builtin_pipe, device="cpu")
    config = UnlearnConfig(batch_size=3, anchor_images=3, related_images=1, sampler_steps=2)
    mixed = parse_concept_set(SET + "  - target: red\n    preserve: [orange]\n").requests
    caches = [build_request_cache(backend, resolve_request(r, builtin_world=True), config, seed=k)
              for k, r in enumerate(mixed)]
    whole = _step_gradients(backend, caches, config, 0, 1, monkeypatch, replay=3)
    parts = _step_gradients(backend, caches, config, 0, 1, monkeypatch, replay=3, micro_batch_size=micro_batch_size)
    shards = [_step_gradients(backend, caches, config, rank, 2, monkeypatch, replay=3, micro_batch_size=micro_batch_size)
              for rank in range(2)]
    for name, grad in whole.items():
        # float sums in another order: a tolerance relative to the gradient's scale
        scale = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(parts[name], grad, rtol=1e-4, atol=scale)
        torch.testing.assert_close((shards[0][name] + shards[1][name]) / 2, grad, rtol=1e-4, atol=scale)


def _step_gradients(backend, cache, config, rank: int, world: int, monkeypatch, replay: int = 0,
                    micro_batch_size: int = 0) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, world))
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        params = edits.start_request(0)
        with torch.no_grad():
            for p in params:  # a non-zero delta, so that every term has a gradient
                p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
        caches = cache if isinstance(cache, list) else [cache]
        step_terms(backend, edits, caches, get_method(config.method), config, np.random.default_rng(5), torch.Generator().manual_seed(5),
                      None, replay=replay, micro_batch_size=micro_batch_size)
        return {name: d.delta.grad.clone() for name, d in edits.deltas.items()}


def test_sharded_gradients_average_to_the_single_process_gradient(builtin_pipe, monkeypatch):
    backend = DiffusersBackend(builtin_pipe, device="cpu")
    config = UnlearnConfig(batch_size=3, anchor_images=3, related_images=1, sampler_steps=2)
    request = resolve_request(parse_concept_set(SET).requests[0], builtin_world=True)
    cache = build_request_cache(backend, request, config, seed=0)
    whole = _step_gradients(backend, cache, config, 0, 1, monkeypatch)
    shards = [_step_gradients(backend, cache, config, rank, 2, monkeypatch) for rank in range(2)]
    for name, grad in whole.items():
        averaged = (shards[0][name] + shards[1][name]) / 2  # what average_gradients computes
        assert grad.abs().max() > 0
        torch.testing.assert_close(averaged, grad, rtol=1e-4, atol=1e-9)


def _unlearn_command(out: Path, concepts: Path) -> list[str]:
    return ["-m", "duge.cli", "unlearn", "--model", "builtin", "--concepts", str(concepts), "--out", str(out),
            "--steps", "6", "--seed", "3", "--lr", "5e-3"]


@pytest.mark.slow
def test_two_cpu_processes_write_the_same_edit_as_one(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on this CUDA-less machine (gloo) vs a single process,
    same seed: the LoRAs agree."""
    from duge.io import load_lora

    concepts = tmp_path / "set.yaml"
    concepts.write_text(SET)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    single = subprocess.run([sys.executable, *_unlearn_command(tmp_path / "single", concepts)], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = Path(sys.executable).with_name("accelerate")
    # Without CUDA, --multi_gpu starts 2 CPU processes joined over gloo (--cpu would start one, without MPI).
    double = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no",
                             *_unlearn_command(tmp_path / "double", concepts)], env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "double" / "report.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "single" / "report.json").read_text())["processes"] == 1
    files = sorted((tmp_path / "single" / "loras").glob("*.safetensors"))
    assert [f.name for f in files] == [f.name for f in sorted((tmp_path / "double" / "loras").glob("*.safetensors"))]
    assert not list(tmp_path.glob(".double.*"))  # the second process wrote nothing of its own
    worst = 0.0
    for path in files:
        one, _ = load_lora(path)
        two, _ = load_lora(tmp_path / "double" / "loras" / path.name)
        for name, delta in one.items():
            worst = max(worst, float((two[name] - delta).abs().max() / delta.abs().max()))
    print(f"largest difference relative to the largest delta entry: {worst:.2e}")
    assert worst < 1e-3

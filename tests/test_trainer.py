"""The continual trainer and the `duge unlearn` job on the built-in model (short runs)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from duge.backends.diffusers_backend import DiffusersBackend
from duge.trainer import UnlearnCancelled, unlearn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests
from trainer_helpers import CONCEPTS, requests_of, tiny_config  # noqa: E402
from trainer_helpers import assert_bit_identical as _assert_bit_identical  # noqa: E402
from trainer_helpers import host_weights as _weights  # noqa: E402


@pytest.fixture(scope="module")
def backend(builtin_pipe):
    return DiffusersBackend(builtin_pipe, device="cpu", dtype="float32")


@pytest.mark.parametrize("setting", ["sequential", "independent", "simultaneous"])
def test_host_model_unchanged_after_a_run(backend, setting):
    before = _weights(backend)
    result = unlearn(backend, requests_of(CONCEPTS, setting), tiny_config(setting=setting))
    _assert_bit_identical(before, backend)
    assert any(float(d.abs().max()) > 0 for d in result.total_delta.values())
    expected = 1 if setting == "simultaneous" else 2
    assert len(result.requests) == expected


def test_host_model_unchanged_after_cancel_and_interrupt(backend):
    before = _weights(backend)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 4  # cancel inside the second request

    with pytest.raises(UnlearnCancelled):
        unlearn(backend, requests_of(CONCEPTS), tiny_config(), cancel=cancel)
    _assert_bit_identical(before, backend)

    def interrupt(info):
        if info["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnCancelled):
        unlearn(backend, requests_of(CONCEPTS), tiny_config(), progress=interrupt)
    _assert_bit_identical(before, backend)


def test_same_seed_same_weights(backend):
    a = unlearn(backend, requests_of(CONCEPTS), tiny_config(seed=3))
    b = unlearn(backend, requests_of(CONCEPTS), tiny_config(seed=3))
    c = unlearn(backend, requests_of(CONCEPTS), tiny_config(seed=4))
    assert all(torch.equal(a.total_delta[k], b.total_delta[k]) for k in a.total_delta)
    assert any(not torch.equal(a.total_delta[k], c.total_delta[k]) for k in a.total_delta)


def test_sequential_total_is_the_sum_of_request_deltas_and_lora_mode_trains(backend):
    result = unlearn(backend, requests_of(CONCEPTS), tiny_config())
    for name, total in result.total_delta.items():
        assert torch.allclose(total, sum(r.delta[name] for r in result.requests), atol=1e-6)
    lora = unlearn(backend, requests_of(CONCEPTS), tiny_config(trainable_mode="lora", trainable_rank=2))
    delta = next(iter(lora.requests[0].delta.values()))
    assert 0 < torch.linalg.matrix_rank(delta) <= 2


def test_only_the_chosen_projections_are_edited(backend):
    result = unlearn(backend, requests_of(CONCEPTS), tiny_config())
    assert result.total_delta and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in result.total_delta)


def test_invalid_settings_are_refused(backend):
    from duge.errors import DugeError

    with pytest.raises(DugeError, match="setting"):
        unlearn(backend, requests_of(CONCEPTS), tiny_config(setting="parallel"))


def test_unlearn_command_end_to_end(tmp_path, monkeypatch):
    """`duge unlearn` on the built-in model writes every output; the LoRAs reproduce the edit."""
    from duge import run
    from duge.cli import main
    from duge.io import load_lora, read_manifest
    from duge.models import load_pipeline

    monkeypatch.setattr(run, "measuring", lambda *args, **kwargs: (
        lambda b, requests, name=None: {"UA": 1.0, "IRA": 1.0, "CRA": 1.0}))  # the metrics themselves are tested elsewhere
    concepts = tmp_path / "set.yaml"
    concepts.write_text(CONCEPTS)
    out = tmp_path / "run"
    assert main(["unlearn", "--model", "builtin", "--concepts", str(concepts), "--out", str(out), "--steps", "3"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["before_after.png", "loras", "model", "model.safetensors", "report.html", "report.json"]
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "circle" in page  # the grid and the requests, self-contained
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").read_text() == page
    report = json.loads((out / "report.json").read_text())
    assert [r["target"] for r in report["requests"]] == ["circle", "red"]
    assert set(report["final"]) >= {"UA", "IRA", "CRA"}
    manifest = read_manifest(out / "model.safetensors")
    assert [r["target"] for r in manifest["requests"]] == ["circle", "red"]
    loras = sorted((out / "loras").iterdir())
    assert [p.name for p in loras] == ["01_circle.safetensors", "02_red.safetensors"]

    base = load_pipeline("builtin").unet.state_dict()
    edited = load_pipeline(out / "model").unet.state_dict()
    total = {}
    for path in loras:
        deltas, _ = load_lora(path)
        for name, delta in deltas.items():
            total[name] = total.get(name, 0) + delta
    assert total
    for name, delta in total.items():
        key = name + ".weight"
        assert torch.allclose(base[key] + delta, edited[key], atol=2e-3)  # fp16 shipped weights, fp32 deltas
    # Refuses to overwrite without the flag; the model folder loads back everywhere --model is accepted.
    assert main(["unlearn", "--model", "builtin", "--concepts", str(concepts), "--out", str(out), "--steps", "1"]) == 2
    assert main(["sample", "--model", str(out / "model"), "--prompt", "a circle", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0


def test_sequential_batches_add_replayed_erasures_and_skip_attention_for_an_empty_anchor(backend, monkeypatch):
    """Request 2 (red, anchor "") trains on batch_size samples of its own plus replay_batch_size of
    request 1 (circle, anchor "shape"); only samples with anchor tokens enter the attention term."""
    import duge.objective as objective

    seen = []
    real_loss = objective.cross_attention_loss

    def spy(pred, ref, maps_target, maps_anchor, beta):
        seen.append((len(pred), len(maps_target[0]) if maps_target else 0))
        return real_loss(pred, ref, maps_target, maps_anchor, beta)

    monkeypatch.setattr(objective, "cross_attention_loss", spy)
    unlearn(backend, requests_of(CONCEPTS), tiny_config(replay_batch_size=3))
    first, second = seen[:3], seen[3:]
    assert all(rows == (2, 2) for rows in first)  # circle alone: every sample has its anchor "shape"
    assert all(rows == (5, 3) for rows in second)  # 2 red + 3 replayed circle; red's anchor has no tokens


def test_replayed_related_images_and_preserve_lists_drop_a_concept_from_the_request_that_erases_it(backend, monkeypatch):
    """yellow preserves green; at request 3 (green) the replayed yellow cache holds no green image, and
    request 3's own prior term never sees green; before that, green was replayed (request 2)."""
    import duge.trainer as trainer

    seen = []
    real_step = trainer.step_terms

    def spy(backend_, edits, caches, *args, **kwargs):
        seen.append([(c.request.target, list(c.related_concepts), list(c.request.preserve)) for c in caches])
        return real_step(backend_, edits, caches, *args, **kwargs)

    monkeypatch.setattr(trainer, "step_terms", spy)
    concepts = """
name: later
requests:
  - target: yellow
    preserve: [orange, green]
  - target: circle
    preserve: [square]
  - target: green
    preserve: [cyan]
"""
    # the per-step teachers' path (teacher_pool 0); the pooled one: tests/test_teachers.py
    unlearn(backend, requests_of(concepts), tiny_config(steps=1, replay_batch_size=2, teacher_pool=0))
    request2, request3 = seen[1], seen[2]
    assert request2[0] == ("yellow", ["orange", "green"], ["orange", "green"])  # not erased yet: replayed
    assert request3[0] == ("yellow", ["orange"], ["orange"])  # erased now: gone from the replayed cache
    assert all("green" not in related and "green" not in kept for _, related, kept in request3)


def test_uce_edits_with_its_own_request_and_uce_resolve_solves_every_request_from_theta0(backend, monkeypatch):
    import duge.uce as uce

    calls = []
    real = uce.uce_delta

    def spy(backend_, edits, requests, config, from_original=False):
        calls.append(([(r.target, list(r.preserve)) for r in requests], from_original))
        return real(backend_, edits, requests, config, from_original)

    monkeypatch.setattr(uce, "uce_delta", spy)
    concepts = """
name: later
requests:
  - target: yellow
    preserve: [orange, green]
  - target: green
    preserve: [cyan]
"""
    sequential = unlearn(backend, requests_of(concepts), tiny_config(method="uce"))
    assert calls == [([("yellow", ["orange", "green"])], False), ([("green", ["cyan"])], False)]
    calls.clear()
    resolved = unlearn(backend, requests_of(concepts), tiny_config(method="uce-resolve"))
    # request 2 solves both from θ0, and yellow's preserve set no longer holds green
    assert calls == [([("yellow", ["orange", "green"])], True), ([("yellow", ["orange"]), ("green", ["cyan"])], True)]
    assert set(resolved.total_delta) == set(sequential.total_delta)
    with backend.edits(r"attn2\.to_[kv]$") as edits:  # the total is the closed form of both requests from θ0
        both = requests_of(concepts)
        both[0].preserve = ["orange"]
        expected = real(backend, edits, both, tiny_config(method="uce-resolve"), from_original=True)
    for name, delta in expected.items():
        torch.testing.assert_close(resolved.total_delta[name], delta, rtol=1e-5, atol=1e-6)
    # the request's own delta is what it added to the model the first request left
    torch.testing.assert_close(sum(r.delta[name] for r in resolved.requests), resolved.total_delta[name])


def test_simultaneous_uce_erases_every_request_together_as_uce_resolve_does_after_the_last(backend):
    """Simultaneous UCE is one closed form over every request's erase set, with the preserve lists the
    continual rule leaves when all are erased (yellow no longer preserves green). That is the problem
    uce-resolve solves from θ0 after the last request of a sequential run (the same erase rows and preserve
    lists, `preserved_at(requests, 1)`), so the two totals are the same."""
    from duge.uce import uce_embeddings

    concepts = """
name: together
requests:
  - target: yellow
    preserve: [orange, green]
  - target: green
    preserve: [cyan]
"""
    together = unlearn(backend, requests_of(concepts, "simultaneous"), tiny_config(method="uce", setting="simultaneous"))
    resolved = unlearn(backend, requests_of(concepts), tiny_config(method="uce-resolve"))
    for name, delta in resolved.total_delta.items():  # exact: the same solve on the same float64 inputs
        assert torch.equal(together.total_delta[name], delta), name
    requests = requests_of(concepts, "simultaneous")
    assert [r.preserve for r in requests] == [["orange"], ["cyan"]]
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        for request in requests:  # each target's K/V outputs move towards its anchor's
            erase, guide, _ = uce_embeddings(backend, [request])
            c, a = erase.double(), guide.double()
            for name in edits.deltas:
                w0 = edits.originals[name].double()
                w1 = w0 + together.total_delta[name].double()
                before, after = (c @ w0.T - a @ w0.T).norm(), (c @ w1.T - a @ w0.T).norm()
                assert after < 0.75 * before, (request.target, name, float(after / before))

"""Interruption and resumption: Ctrl-C / cancel change nothing, NaN rolls a request back, --resume
continues a stopped sequential run and ends with exactly the weights of an uninterrupted one."""

import json
import sys
from pathlib import Path

import pytest
import torch

from duge import run, trainer
from duge.backends.diffusers_backend import DiffusersBackend
from duge.concepts import parse_concept_set
from duge.progress import ProgressCheckpoint, ResumeError, run_inputs
from duge.trainer import TrainingDiverged, UnlearnCancelled, unlearn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests
from trainer_helpers import CONCEPTS, assert_bit_identical, host_weights, requests_of, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def backend(builtin_pipe):
    return DiffusersBackend(builtin_pipe, device="cpu", dtype="float32")


def _interrupt_in(target: str, step: int):
    """A progress callback that presses Ctrl-C inside `step` of the request on `target`."""
    def progress(info):
        if info["request"] == target and info["step"] == step:
            raise KeyboardInterrupt
    return progress


@pytest.mark.parametrize("overrides", [{}, {"teacher_pool": 4, "regularizer": "projection"},
                                       {"adversarial_every": 1, "adversarial_budget": 40},
                                       {"adversarial_every": 1, "adversarial_budget": 40, "adversarial_attack": "inversion"},
                                       {"output_erasure_rank": 2}])
def test_resume_after_ctrl_c_gives_exactly_the_uninterrupted_weights(backend, tmp_path, overrides):
    """Also with teacher pools: the resumed run rebuilds the finished requests' pools as they were; and with
    adversarial training: the interrupted request searches its attack prompts again, as the uninterrupted run
    did, and the finished one's are read back from its checkpoint."""
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config(**overrides)
    inputs = run_inputs("builtin", "test", config, concept_set)
    full = unlearn(backend, requests_of(CONCEPTS), config)

    before = host_weights(backend)
    checkpoint = ProgressCheckpoint(tmp_path / "progress", inputs)
    with pytest.raises(UnlearnCancelled):
        unlearn(backend, requests_of(CONCEPTS), config, progress=_interrupt_in("red", 2),
                on_request_done=checkpoint.save)
    assert_bit_identical(before, backend)  # Ctrl-C inside a step left the host as it was
    assert checkpoint.completed == 1

    checkpoint, state, _ = ProgressCheckpoint.load(tmp_path / "progress", inputs)
    assert [r.target for r in state.results] == ["circle"]
    resumed = unlearn(backend, requests_of(CONCEPTS), config, resume=state,
                      on_request_done=checkpoint.save)
    assert_bit_identical(before, backend)
    assert [r.target for r in resumed.requests] == ["circle", "red"]
    for name, total in full.total_delta.items():  # exact: the same float32 operations in the same order
        assert torch.equal(total, resumed.total_delta[name]), name
    for a, b in zip(full.requests, resumed.requests):
        assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
        assert _without_seconds(a.adversarial) == _without_seconds(b.adversarial)
        assert bool(b.adversarial) == bool(config.adversarial_every)
    assert checkpoint.completed == 2


def _without_seconds(searches: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in searches]


def test_resumed_teacher_pools_settle_the_memory_choice_as_the_uninterrupted_run(backend, tmp_path, monkeypatch):
    """The resumed run rebuilds the finished requests' pools before it trains, so it settles the run's memory
    choice there: with the same inputs as the first request of an uninterrupted run (its trainable parameters
    present, the step's batch_size + replay_batch_size rows), and so the same micro-batches. The budget is set
    so that 4 of the 6 rows fit: batch_size rows alone would fit whole."""
    from duge import memory

    seen = []
    real = memory.choose_memory_settings

    def spy(rows, full_bytes_per_row, checkpointed_bytes_per_row, budget_bytes, *args):
        seen.append((rows, full_bytes_per_row, checkpointed_bytes_per_row, budget_bytes))
        choice = real(rows, full_bytes_per_row, checkpointed_bytes_per_row, budget_bytes, *args)
        seen[-1] += (choice,)
        return choice

    monkeypatch.setattr(memory, "choose_memory_settings", spy)
    config = tiny_config(teacher_pool=4, replay_batch_size=4, memory_budget_gb=64.0)
    unlearn(backend, requests_of(CONCEPTS), config)  # measures a row; the budget then fits 4 of the 6 rows
    rows, per_row, _, budget, _ = seen.pop()
    assert rows == config.batch_size + config.replay_batch_size and per_row > 0
    optimizer_bytes = 64.0 * 2**30 - budget  # the trainable parameters' gradients and AdamW moments
    config.memory_budget_gb = (4.5 * per_row * memory.BACKWARD_PEAK + optimizer_bytes) / 2**30
    inputs = run_inputs("builtin", "test", config, parse_concept_set(CONCEPTS))
    full = unlearn(backend, requests_of(CONCEPTS), config)
    uninterrupted = seen.pop()
    assert uninterrupted[-1].micro_batch_size == 4
    assert real(config.batch_size, *uninterrupted[1:4]).micro_batch_size == 0  # the batch alone would fit whole

    checkpoint = ProgressCheckpoint(tmp_path / "progress", inputs)
    with pytest.raises(UnlearnCancelled):
        unlearn(backend, requests_of(CONCEPTS), config, progress=_interrupt_in("red", 2), on_request_done=checkpoint.save)
    seen.clear()
    checkpoint, state, _ = ProgressCheckpoint.load(tmp_path / "progress", inputs)
    resumed = unlearn(backend, requests_of(CONCEPTS), config, resume=state, on_request_done=checkpoint.save)
    assert seen == [uninterrupted]  # settled once, from the same inputs, to the same choice
    for name, total in full.total_delta.items():
        assert torch.equal(total, resumed.total_delta[name]), name


def test_resume_refuses_other_inputs_and_damaged_files(backend, tmp_path):
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config()
    inputs = run_inputs("builtin", "test", config, concept_set)
    checkpoint = ProgressCheckpoint(tmp_path / "progress", inputs)
    with pytest.raises(UnlearnCancelled):
        unlearn(backend, requests_of(CONCEPTS), config, progress=_interrupt_in("red", 1),
                on_request_done=checkpoint.save)

    other = run_inputs("builtin", "test", tiny_config(steps=4, seed=1), concept_set)
    with pytest.raises(ResumeError, match=r"differs: config\.seed: checkpoint 0, now 1; config\.steps: checkpoint 3, now 4"):
        ProgressCheckpoint.load(tmp_path / "progress", other)
    changed_set = parse_concept_set(CONCEPTS.replace("[orange]", "[pink]"))
    with pytest.raises(ResumeError, match="the concept set"):
        ProgressCheckpoint.load(tmp_path / "progress", run_inputs("builtin", "test", config, changed_set))
    with pytest.raises(ResumeError, match="model_sha256"):
        ProgressCheckpoint.load(tmp_path / "progress", run_inputs("builtin", "other", config, concept_set))

    request_file = tmp_path / "progress" / "request_01.safetensors"
    data = bytearray(request_file.read_bytes())
    data[-1] ^= 0xFF
    request_file.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="request_01.safetensors' changed since it was written"):
        ProgressCheckpoint.load(tmp_path / "progress", inputs)
    with pytest.raises(ResumeError, match="nothing to resume"):
        ProgressCheckpoint.load(tmp_path / "elsewhere", inputs)
    with pytest.raises(trainer.DugeError, match="simultaneous run .* cannot be resumed"):
        unlearn(backend, requests_of(CONCEPTS), tiny_config(setting="simultaneous"),
                resume=trainer.ResumeState([], []))


def _recording_edits(backend, monkeypatch):
    """Keep the LayerEdits of each run, to look at its committed deltas after the run has failed."""
    seen = []
    original = backend.edits

    def edits(*args, **kwargs):
        context = original(*args, **kwargs)

        class Recorder:
            def __enter__(self):
                seen.append(context.__enter__())
                return seen[-1]

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Recorder()

    monkeypatch.setattr(backend, "edits", edits)
    return seen


def test_nan_loss_rolls_the_request_back_with_a_clear_error(backend, monkeypatch):
    done = []
    before = host_weights(backend)
    seen = _recording_edits(backend, monkeypatch)
    real_step = trainer.step_terms

    def nan_on_red(backend_, edits, caches, *args, **kwargs):
        losses = real_step(backend_, edits, caches, *args, **kwargs)
        return {**losses, "total": float("nan")} if caches[-1].request.target == "red" else losses

    monkeypatch.setattr(trainer, "step_terms", nan_on_red)
    with pytest.raises(TrainingDiverged) as error:
        unlearn(backend, requests_of(CONCEPTS), tiny_config(teacher_pool=0),  # the per-step path's step_terms
                on_request_done=lambda k, result, cache: done.append(result))
    assert str(error.value) == ("request 'red': loss became nan at step 1; the request was rolled back — "
                                "lower the learning rate")
    committed = seen[-1].committed()
    assert [r.target for r in done] == ["circle"]
    assert all(torch.equal(committed[n], done[0].delta[n]) for n in committed)  # back to after request 1
    assert_bit_identical(before, backend)


@pytest.mark.parametrize("learning_rate", ["1.0e+30", "1.0e+38"])
def test_exploding_learning_rate_is_caught_and_rolled_back(backend, monkeypatch, learning_rate):
    requests = requests_of(CONCEPTS.replace("  - target: red\n", f"  - target: red\n    learning_rate: {learning_rate}\n"))
    seen = _recording_edits(backend, monkeypatch)
    done = []
    expected = (r"the optimiser step overflowed at step 1 \(learning rate 1e\+38\)" if learning_rate == "1.0e+38"
                else "loss became (nan|inf) at step 2")  # weights of ~1e30 are finite; what they compute is not
    with pytest.raises(TrainingDiverged, match=f"request 'red': {expected}; the request was rolled back"):
        unlearn(backend, requests, tiny_config(),
                on_request_done=lambda k, result, cache: done.append(result))
    committed = seen[-1].committed()
    assert all(torch.equal(committed[n], done[0].delta[n]) for n in committed)


@pytest.fixture
def quick_run(monkeypatch):
    """`run_unlearn` with its measurements and grids stubbed (tested elsewhere): only training and saving."""
    monkeypatch.setattr(run, "measuring", lambda *args, **kwargs: (
        lambda b, requests, name=None: {"UA": 1.0, "IRA": 1.0, "CRA": 1.0}))
    from PIL import Image

    monkeypatch.setattr(run, "before_after_grid", lambda *args, **kwargs: Image.new("RGB", (4, 4)))


def _unet_tensors(path):
    from duge.safe_weights import load_tensors

    return {k: v for k, v in load_tensors(path).items() if k.startswith("model.diffusion_model.")}


def test_output_folder_with_only_progress_needs_resume_and_other_content_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / "progress").mkdir(parents=True)
    with pytest.raises(run.OutputExistsError, match="holds the progress of an interrupted run; pass --resume"):
        run.prepare_output_folder(out, overwrite=False)
    tmp = run.prepare_output_folder(out, overwrite=False, resume=True)
    assert tmp.parent == tmp_path and tmp.name.startswith(".run.")
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(run.OutputExistsError, match=r"not empty \(model.safetensors\); pass --overwrite"):
        run.prepare_output_folder(out, overwrite=False, resume=True)


def test_resume_without_progress_fails_fast_on_the_command_line(tmp_path, capsys):
    from duge.cli import main

    concepts = tmp_path / "set.yaml"
    concepts.write_text(CONCEPTS)
    out = tmp_path / "run"
    assert main(["unlearn", "--concepts", str(concepts), "--out", str(out), "--resume", "--allow-pickle"]) == 2
    assert f"nothing to resume: '{out / 'progress' / 'state.json'}' does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.yaml"]  # nothing created, no temporary left


@pytest.mark.slow  # three runs of `run_unlearn` (about 20 s on a loaded 2-core CPU)
def test_run_unlearn_interrupted_writes_only_progress_and_resume_finishes_it(tmp_path, quick_run, monkeypatch):
    concepts = tmp_path / "set.yaml"
    concepts.write_text(CONCEPTS)
    config = tiny_config()
    reference = run.run_unlearn("builtin", concepts, tmp_path / "reference", config, log=lambda *a: None)

    out = tmp_path / "run"
    logged = []
    with pytest.raises(UnlearnCancelled):
        run.run_unlearn("builtin", concepts, out, config, progress=_interrupt_in("red", 1), log=logged.append)
    assert sorted(p.name for p in out.iterdir()) == ["progress"]  # no final output, only the checkpoint
    assert sorted(p.name for p in (out / "progress").iterdir()) == [
        "request_01.safetensors", "state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "run", "set.yaml"]
    assert "continue with --resume" in logged[-1]

    with pytest.raises(run.OutputExistsError, match="pass --resume"):
        run.run_unlearn("builtin", concepts, out, config, log=lambda *a: None)
    with pytest.raises(ResumeError, match=r"config\.steps"):
        run.run_unlearn("builtin", concepts, out, tiny_config(steps=4), resume=True, log=lambda *a: None)

    report = run.run_unlearn("builtin", concepts, out, config, resume=True, log=logged.append)
    assert "resuming after request 1 of 2 (circle done)" in logged
    assert [r["target"] for r in report["requests"]] == ["circle", "red"]
    assert "progress" not in {p.name for p in out.iterdir()}  # the finished outputs replaced it
    resumed, uninterrupted = _unet_tensors(out / "model.safetensors"), _unet_tensors(tmp_path / "reference" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert json.loads((out / "report.json").read_text())["requests"][0]["final_losses"] == \
        reference["requests"][0]["final_losses"]

"""`duge unlearn`'s phases and `--eval`: every phase reports its work as it is done, and measuring
happens when asked (each request, the last, or never)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from duge import run
from duge.config import UnlearnConfig
from duge.phases import Phases
from duge import measuring
from duge.world import callbacks

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests
from trainer_helpers import tiny_config  # noqa: E402

ONE_REQUEST = """
name: one
requests:
  - target: circle
    preserve: [square]
"""
TWO_REQUESTS = ONE_REQUEST + """  - target: red
    preserve: [orange]
"""


class RecordedPhases(Phases):
    """Every phase with what it announced and each advance it received."""

    def __init__(self):
        super().__init__()
        self.log: list[dict] = []

    def started(self, name, total, unit, kind):
        self.log.append({"name": name, "total": total, "unit": unit, "kind": kind, "advances": [], "previews": 0})

    def advanced(self, n, latents, image):
        self.log[-1]["advances"].append(n)
        self.log[-1]["previews"] += latents is not None or image is not None


def _concepts(tmp_path, text) -> str:
    path = tmp_path / "set.yaml"
    path.write_text(text)
    return str(path)


def test_every_phase_advances_step_by_step_while_it_works(tmp_path, monkeypatch):
    phases = RecordedPhases()
    report = run.run_unlearn("builtin", _concepts(tmp_path, ONE_REQUEST), tmp_path / "out",
                             tiny_config(eval="final", sampler_steps=4, eval_steps=2), phases=phases, log=lambda *a: None)
    names = [p["name"] for p in phases.log]
    # the before/after grid is the two measurements' own images: no sampling of its own
    assert names == ["loading the model", "measuring the unedited model", "images for 'circle'",
                     "teachers for 'circle'", "training 'circle'", "measuring after 'circle'", "writing outputs"]
    for phase in phases.log:
        assert sum(phase["advances"]) == pytest.approx(phase["total"]), phase["name"]  # the count reaches its total
        assert phase["total"] > 0
    by_name = {p["name"]: p for p in phases.log}
    images = by_name["images for 'circle'"]  # 2 anchor + 1 related image, 4 sampler steps, one batch
    assert images["total"] == 3 and len([n for n in images["advances"] if n > 0]) == 4 and images["previews"] == 1
    measured = by_name["measuring after 'circle'"]
    # UA: 3 paraphrases x 2 names x 4 images; acc(c): 8 images of each of the 20 kept concepts, made in sampler
    # calls of 64 images across concepts (3 calls); each call advances once per sampler step (eval_steps 2), so the bar
    # moves 2x per call, never only at the end.
    assert measured["total"] == 24 + 20 * 8
    assert len([n for n in measured["advances"] if n > 0]) == 2 * 3 and measured["previews"] == 3
    assert by_name["training 'circle'"]["advances"] == [1, 1, 1]
    teachers = by_name["teachers for 'circle'"]  # tiny_config's pool of 4 rows, and 4 related rows (square)
    assert teachers["unit"] == "row" and teachers["kind"] == "training" and teachers["total"] == 8
    assert phases.counts["training"] == {"row": 8, "step": 3}
    assert set(phases.seconds) == {"loading", "images", "training", "measuring", "writing"}
    assert (tmp_path / "out" / "before_after.png").is_file()
    assert report["eval"] == "final" and report["final"]["UA"] is not None
    assert json.loads((tmp_path / "out" / "report.json").read_text())["before"]["UA"] is not None


@pytest.mark.parametrize("mode, measured_after", [("each", [2, 1, 2]), ("final", [2, 2]), ("none", [])])
def test_eval_measures_each_request_only_the_last_or_never(tmp_path, monkeypatch, mode, measured_after):
    """[2, 1, 2]: the unedited model on both requests, then after request 1 (1 request), after request 2."""
    calls = []
    monkeypatch.setattr(run, "measuring", lambda *a, **k: (
        lambda backend, requests, name=None: calls.append(len(requests)) or {"UA": 0.5, "IRA": 0.9, "CRA": 0.9}))
    monkeypatch.setattr(run, "before_after_grid", lambda *a, **k: __import__("PIL.Image").Image.new("RGB", (4, 4)))
    report = run.run_unlearn("builtin", _concepts(tmp_path, TWO_REQUESTS), tmp_path / "out", tiny_config(eval=mode),
                             log=lambda *a: None)
    assert calls == measured_after
    assert report["eval"] == mode
    if mode == "none":
        assert "final" not in report and "before" not in report
    else:
        assert report["final"]["UA"] == 0.5 and report["before"]["UA"] == 0.5
    if mode == "final":
        assert report["requests"][0]["UA"] is None


def test_auto_measures_the_builtin_world_and_refuses_each_without_a_classifier():
    from duge.evaluation import MissingClassifierError

    assert measuring.measuring_mode("auto", True) == "each"
    assert measuring.measuring_mode("auto", False) == "none"
    assert measuring.measuring_mode("final", True) == "final"
    with pytest.raises(MissingClassifierError, match="--eval each.*classifier"):
        measuring.measuring_mode("each", False, "my-model.safetensors")


def test_count_images_counts_what_the_measurement_generates():
    from duge.concepts import ConceptRequest, resolve_request
    from duge.evaluation import measure_requests, world_measured_concepts

    requests = [resolve_request(ConceptRequest("red"), builtin_world=True)]
    generated = []

    def measure(generate, reader):
        return measure_requests(lambda p, s: generated.append(len(p)) or generate(p, s), reader, requests,
                                world_measured_concepts(), samples_per_prompt=2, retention_samples=3)

    assert measuring.count_images(measure) == sum(generated) == 3 * 2 * 2 + 20 * 3  # red/crimson, 3 paraphrases; 20 kept


def test_demo_measures_before_and_after_the_last_request(monkeypatch):
    from duge import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_unlearn_job", lambda model, concepts, out, config, *a, **k: seen.update(
        model=model, eval=config.eval) or 0)
    assert cli.main(["demo", "--out", "x"]) == 0
    assert seen == {"model": "builtin", "eval": "final"}
    assert cli.main(["demo", "--out", "x", "--eval", "each"]) == 0 and seen["eval"] == "each"


def test_eval_command_measures_through_the_phases_and_writes_the_metrics(tmp_path, monkeypatch):
    from duge.cli import main

    seen = {}

    def world_evaluate(backend, evaluator, seed, steps, phases=None):
        seen["phases"], seen["steps"] = type(phases).__name__, steps
        return lambda b, requests, name=None: {"UA": 0.25, "IRA": 1.0, "CRA": 0.5, "H": 0.4, "UA_per_concept": {},
                                               "accuracy_per_concept": {}}

    monkeypatch.setattr(callbacks, "world_evaluate", world_evaluate)
    out = tmp_path / "m.json"
    assert main(["eval", "--concepts", _concepts(tmp_path, ONE_REQUEST), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["UA"] == 0.25 and seen["phases"] == "TqdmPhases"
    assert seen["steps"] == UnlearnConfig().eval_steps == json.loads(out.read_text())["eval_steps"]
    assert main(["eval", "--concepts", _concepts(tmp_path, ONE_REQUEST), "--json", str(out), "--eval-steps", "3"]) == 0
    assert seen["steps"] == 3 == json.loads(out.read_text())["eval_steps"]


def test_planned_images_are_the_images_each_call_would_have_made():
    """A measurement's images made ahead in batches across its calls: each call gets image i of seed `seed + i`
    for its own prompts, whatever batch it was made in; a call the plan does not have is refused."""
    from duge.errors import DugeError

    def image_of(prompt, seed):  # a stand-in for a sampler: one value per (prompt, seed)
        return torch.full((3, 1, 1), float(hash(prompt) % 997 + seed))

    made = []

    def make(prompts, seeds):
        made.append(len(prompts))
        return torch.stack([image_of(p, s) for p, s in zip(prompts, seeds)])

    calls = [(["a", "a", "b"], 10), (["c"] * 5, 20), (["d", "e"], 30)]
    generate = measuring.PlannedImages(make, calls, batch_size=4)
    for prompts, seed in calls:
        expected = torch.stack([image_of(p, seed + i) for i, p in enumerate(prompts)])
        assert torch.equal(generate(prompts, seed), expected)
    assert made == [4, 4, 2]  # 10 images in calls of 4, across the measurement's calls
    with pytest.raises(DugeError, match="out of the order it planned"):
        measuring.PlannedImages(make, calls, 4)(["a", "a", "b"], 11)


def test_a_bar_fed_fractions_of_images_ends_at_its_total_without_a_warning():
    """64 images over 20 sampler steps add up to 64.00000000000001 in floats: the bar stops at 64, quietly."""
    import warnings

    from duge.phases import TqdmPhases

    phases = TqdmPhases()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "clamping frac to range [0, 1]" would fail the test
        with phases.phase("measuring", 64, "image", "measuring"):
            for _ in range(20):
                phases.advance(64 / 20)
            assert phases._bar.n == 64


class SeedImages:
    """A stand-in backend whose image of (prompt, seed) is one value, different for the model before and after."""

    def __init__(self, offset: float):
        self.offset = offset

    def generate(self, prompts, seeds, steps, guidance, on_step=None):
        for _ in range(steps):
            if on_step:
                on_step()
        return torch.stack([torch.full((3, 2, 2), self.value(p, s)) for p, s in zip(prompts, seeds)])

    def value(self, prompt, seed):
        return (hash(prompt) % 97 + seed % 89) / 200 + self.offset


def test_the_grid_shows_the_images_the_first_and_last_measurements_read():
    """`Measuring.shown` keeps, of its last measurement, the first images of the prompts asked for, exactly as
    the classifier saw them; `measured_grid` lays them out before/after, and gives up (None) when a target's
    images are missing, e.g. a resumed run's first measurement."""
    from duge.concepts import ConceptRequest, resolve_request
    from duge.evaluation import shown_prompts, world_measured_concepts

    concepts = world_measured_concepts()
    requests = [resolve_request(ConceptRequest("circle", preserve=["square", "red"]), builtin_world=True),
                resolve_request(ConceptRequest("red", preserve=["square", "orange"]), builtin_world=True)]
    targets, preserved = shown_prompts(requests, concepts)
    assert len(targets) == 2 and "circle" in targets[0] and "red" in targets[1]
    assert len(preserved) == 2 and all("red" not in p for p in preserved)  # red is erased: not measured, not shown
    seen = []

    class Classifier:  # records what it read; names nothing
        def predict(self, images):
            seen.append(images.clone())
            return {kind: ["?"] * len(images) for kind in ("object", "colour", "style")}

    shown = {}
    for name, backend in (("before", SeedImages(0.0)), ("after", SeedImages(0.5))):
        evaluate = measuring.measuring(backend, Classifier(), concepts, seed=5, steps=2, batch_size=16,
                                       keep_prompts=targets + preserved, keep=4)
        evaluate(None, requests, name)
        shown[name] = evaluate.shown
        assert set(evaluate.shown) == set(targets + preserved)
        for prompt, images in evaluate.shown.items():
            assert images.shape == (4, 3, 2, 2)
            assert any(torch.equal(images, read[i : i + 4]) for read in seen for i in range(len(read) - 3)), prompt
    assert not torch.equal(shown["before"][targets[0]], shown["after"][targets[0]])
    grid = run.measured_grid(shown["before"], shown["after"], targets, preserved)
    assert grid is not None and grid.height > 4 * 2 and grid.width > 8 * 2
    assert run.measured_grid({}, shown["after"], targets, preserved) is None

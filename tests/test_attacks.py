"""Attacks on edited models (duge.attacks, `duge attack`) in quick mode, on the built-in world.

The edited model of these tests is UCE's closed-form edit (a fraction of a second to make); the
numbers below were chosen so that each test runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from duge.config import AttackConfig
from duge.attacks import (DenoisingObjective, PassCounter, attack_concept, attack_models, candidate_token_ids,
                          place_attack_tokens, search_prompt, target_latents)
from duge.backends.diffusers_backend import DiffusersBackend
from duge.cli import main
from duge.concepts import load_concept_set, resolve_concept_set
from duge.errors import DugeError, ModelLoadError
from duge.evaluation import find_concept, world_measured_concepts
from duge.trainer import UnlearnConfig, unlearn

QUICK = dict(objective_images=2, objective_timesteps=2, sample_steps=8, eval_images=8)


def _concept(name: str):
    return find_concept(name, world_measured_concepts())


@pytest.fixture(scope="module")
def base(builtin_pipe):
    return DiffusersBackend(builtin_pipe, dtype="float32")


@pytest.fixture(scope="module")
def striped_erased(base, tmp_path_factory):
    """The built-in model with "striped" erased by UCE's closed form."""
    path = tmp_path_factory.mktemp("uce") / "striped.yaml"
    path.write_text("name: striped\nrequests:\n  - target: striped\n")
    result = unlearn(base, resolve_concept_set(load_concept_set(path), True, "sequential"), UnlearnConfig(method="uce"))
    return DiffusersBackend(base.edited_pipeline(result.total_delta), dtype="float32")


def test_encoding_token_ids_gives_the_typed_prompts_conditioning_and_images(base):
    ids = base.pad_token_ids([base.prompt_token_ids("a striped red star")])
    context = base.encode_tokens(ids)
    assert torch.equal(context, base.encode_prompts(["a striped red star"]))
    table = base.token_embedding_table()
    assert torch.equal(base.encode_tokens(ids, table[ids[0]][None]), context)  # the hook path, same embeddings
    typed = base.generate(["a striped red star"] * 2, 3, 4, 7.5)
    assert torch.equal(base.generate_from_context(context.expand(2, -1, -1), 3, 4, 7.5), typed)


def test_attack_tokens_are_placed_before_or_between_the_prompts_words():
    prompt = [1, 10, 11, 12, 2]  # start, three words, end
    assert place_attack_tokens(prompt, [7, 8], "prefix") == ([1, 7, 8, 10, 11, 12, 2], [1, 2])
    ids, positions = place_attack_tokens(prompt, [7, 8], "insert")
    assert ids == [1, 10, 7, 11, 8, 12, 2] and [ids[p] for p in positions] == [7, 8]


def test_candidate_tokens_leave_out_special_tokens_and_rows_they_share(base):
    table = base.token_embedding_table()
    candidates = candidate_token_ids(table, base.special_token_ids())
    vocabulary = base.tokenizer.get_vocab()
    words = {vocabulary[f"{w}</w>"] for w in ("circle", "red", "striped", "shape")}
    assert words <= set(candidates.tolist())
    assert not base.special_token_ids() & set(candidates.tolist())
    assert len(torch.unique(table[candidates], dim=0)) == len(candidates)  # one id per distinct row


@pytest.mark.parametrize("search", ["greedy", "gradient"])
def test_prompt_search_lowers_its_objective_below_the_plain_prompts(base, striped_erased, search):
    concept = _concept("striped")
    config = AttackConfig(budget=1000, search=search, **QUICK)
    latents = target_latents(base, concept.retention_prompt, config)
    counter = PassCounter(config.budget)
    objective = DenoisingObjective(striped_erased, latents, config.objective_timesteps,
                                   torch.Generator().manual_seed(0), counter)
    plain = float(objective.losses(striped_erased.encode_prompts([concept.retention_prompt]))[0])
    counter.spent = 0
    ids, curve, used = search_prompt(striped_erased, objective, striped_erased.prompt_token_ids(concept.retention_prompt),
                                     config, np.random.default_rng(0))
    assert used == search and counter.spent <= config.budget
    assert curve[-1] < plain, f"{search}: best objective {curve[-1]:.5f}, plain prompt's {plain:.5f}"
    with torch.no_grad():
        found = float(objective.losses(striped_erased.encode_tokens(striped_erased.pad_token_ids([ids])))[0])
    assert found == pytest.approx(curve[-1], rel=1e-5)  # the returned prompt is the one that scored
    assert len(ids) == len(striped_erased.prompt_token_ids(concept.retention_prompt)) + config.tokens


def test_concept_inversion_recovers_a_concept_from_the_unedited_model(base, evaluator):
    concept = _concept("red")
    config = AttackConfig(attack="inversion", budget=600, **QUICK)
    latents = target_latents(base, concept.retention_prompt, config)
    untrained = attack_concept(base, latents, evaluator, concept, AttackConfig(attack="inversion", budget=10, **QUICK))
    assert untrained.attacks[0].unet_passes <= 10 and untrained.attacks[0].ua >= 0.5  # the starting token is not red
    result = attack_concept(base, latents, evaluator, concept, config)
    inversion = result.attacks[0]
    assert inversion.attack == "inversion" and inversion.unet_passes <= config.budget
    assert inversion.ua <= 0.25, f"only {1 - inversion.ua:.2f} of the inverted token's images show red"
    assert "red" in inversion.nearest_tokens or "crimson" in inversion.nearest_tokens
    assert len(inversion.embedding) == base.token_embedding_table().shape[1]
    assert inversion.prompt == concept.retention_prompt.replace("red", "<concept>")  # "an image of a <concept> shape"


def test_judgement_seeds_must_be_held_out_from_the_objectives():
    with pytest.raises(DugeError, match="held out"):
        AttackConfig(seed=0, objective_images=4, eval_seed=2).validate()
    with pytest.raises(DugeError, match="budget"):
        AttackConfig(budget=0).validate()


def _concepts_file(folder: Path) -> Path:
    path = folder / "red.yaml"
    path.write_text("name: red\nrequests:\n  - target: red\n")
    return path


class _Marker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_models_refused_by_the_checked_loader_are_refused_here(tmp_path):
    from duge.world.model import BUILTIN_MODEL_DIR

    concepts = _concepts_file(tmp_path)
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": _Marker(tmp_path / "ran")}}, pickled)
    with pytest.raises(ModelLoadError, match="is a pickled"):
        attack_models(str(pickled), "builtin", str(concepts), AttackConfig(**QUICK), log=lambda *a: None)
    out = tmp_path / "attack.json"
    assert main(["attack", "--model", str(pickled), "--base", "builtin", "--concepts", str(concepts),
                 "--json", str(out)]) == 2
    assert not (tmp_path / "ran").exists() and not out.exists()

    broken = tmp_path / "nan-model"
    shutil.copytree(BUILTIN_MODEL_DIR, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match="NaN"):
        attack_models("builtin", str(broken), str(concepts), AttackConfig(**QUICK), log=lambda *a: None)


def test_attack_command_runs_end_to_end_and_writes_its_json_atomically(tmp_path, capsys, monkeypatch):
    concepts = _concepts_file(tmp_path)
    out = tmp_path / "attack.json"
    quick = ["--budget", "300", "--eval-images", "2", "--sample-steps", "4", "--objective-images", "1"]
    assert main(["attack", "--model", "builtin", "--base", "builtin", "--concepts", str(concepts),
                 "--json", str(out), *quick]) == 0
    doc = json.loads(out.read_text())
    (red,) = doc["concepts"]
    assert red["concept"] == "red" and [a["attack"] for a in red["attacks"]] == ["prompt", "inversion"]
    assert all(a["unet_passes"] <= 300 for a in red["attacks"])
    assert red["post_attack_UA"] == min([red["ua_plain"]] + [a["ua"] for a in red["attacks"]])
    assert doc["config"]["budget"] == 300 and doc["config"]["eval_seed"] == AttackConfig().eval_seed
    printed = capsys.readouterr().out
    assert "post-attack" in printed and "a red shape" in printed

    # An existing file is kept without --overwrite; Ctrl-C leaves no file behind.
    assert main(["attack", "--model", "builtin", "--base", "builtin", "--concepts", str(concepts),
                 "--json", str(out), *quick]) == 2
    import duge.attacks

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(duge.attacks, "attack_concept", interrupted)
    second = tmp_path / "second.json"
    assert main(["attack", "--model", "builtin", "--base", "builtin", "--concepts", str(concepts),
                 "--json", str(second), *quick]) == 130
    assert not second.exists() and not list(tmp_path.glob(".second.json*"))


def test_unlearn_with_attack_adds_a_robustness_section_to_the_report(tmp_path, monkeypatch):
    from PIL import Image

    from duge import run

    # The run's own measurements and before/after grid are tested elsewhere; only the attack is measured here.
    monkeypatch.setattr(run, "measuring", lambda *args, **kwargs: (
        lambda b, requests, name=None: {"UA": 1.0, "IRA": 1.0, "CRA": 1.0}))
    monkeypatch.setattr(run, "before_after_grid", lambda *args, **kwargs: Image.new("RGB", (4, 4)))
    out = tmp_path / "run"
    assert main(["unlearn", "--method", "uce", "--concepts", str(_concepts_file(tmp_path)), "--out", str(out),
                 "--attack", "--attack-budget", "300", "--attack-eval-images", "2", "--attack-sample-steps", "4",
                 "--attack-objective-images", "1"]) == 0
    robustness = json.loads((out / "report.json").read_text())["robustness"]
    (red,) = robustness["concepts"]
    assert red["concept"] == "red" and len(red["attacks"]) == 2
    assert robustness["config"]["budget"] == 300 and robustness["images"] == "robustness/attacks.png"
    with Image.open(out / "robustness" / "attacks.png") as grid:
        assert grid.height >= 3 * 128  # the plain prompt's row and one per attack
    page = (out / "report.html").read_text()
    assert "Robustness: does an erased concept come back?" in page and 'alt="attack images"' in page
    assert red["attacks"][0]["prompt"] in page

"""Adversarial training (duge.adversarial, `duge unlearn --adversarial N`) on the built-in model, in runs of seconds:
the searches run at their steps, their prompts reach the trainable pass, nothing of the host changes, and bad
settings are refused. Resumption with it: tests/test_resume.py."""

import sys
from pathlib import Path

import pytest
import torch

import duge.adversarial
import duge.objective
from duge.adversarial import AdversarialSearch, searches_in, with_attack_embeddings
from duge.attacks import candidate_token_ids, inverted_context, replace_name_with_placeholder
from duge.backends.diffusers_backend import DiffusersBackend
from duge.batches import Batch, learnt_conditioning, with_attack_prompts
from duge.cli import _unlearn_config, build_parser
from duge.concepts import parse_concept_set
from duge.edits import trainable_pattern
from duge.errors import DugeError
from duge.phases import Phases
from duge.progress import run_inputs
from duge.trainer import UnlearnCancelled, unlearn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests
from trainer_helpers import CONCEPTS, assert_bit_identical, host_weights, requests_of, tiny_config  # noqa: E402

QUICK = dict(steps=5, adversarial_every=2, adversarial_budget=40)  # searches at steps 2 and 4 of each request


@pytest.fixture(scope="module")
def backend(builtin_pipe):
    return DiffusersBackend(builtin_pipe, device="cpu", dtype="float32")


class CountingPhases(Phases):
    """Keeps every advance of the training phases counted in steps (not the teacher pools' rows), to see the
    searches counted as they spend."""

    def __init__(self):
        super().__init__()
        self.training_advances: list[float] = []
        self.unit = None

    def started(self, name, total, unit, kind):
        self.unit = unit

    def advanced(self, n, latents, image):
        if self.kind == "training" and self.unit == "step":
            self.training_advances.append(n)


@pytest.mark.parametrize("teacher_pool", [0, 4])  # teachers at every step, or once per request (duge.teachers)
def test_searches_run_every_n_steps_and_their_prompts_are_trained_from_then_on(backend, monkeypatch, teacher_pool):
    encoded = []  # (request, step, prompt) of every prompt the run encodes
    where = {"request": None, "step": 0}
    real = backend.encode_prompts

    def spy(prompts):
        encoded.extend((where["request"], where["step"], p) for p in prompts)
        return real(prompts)

    def progress(info):  # info["step"] steps of info["request"] are done
        where.update(request=info["request"], step=info["step"] % info["steps"])

    monkeypatch.setattr(backend, "encode_prompts", spy)
    phases = CountingPhases()
    result = unlearn(backend, requests_of(CONCEPTS), tiny_config(**QUICK, teacher_pool=teacher_pool),
                     progress=progress, phases=phases)
    for request in result.requests:
        assert [s["step"] for s in request.adversarial] == [2, 4]
        for search in request.adversarial:
            assert search["prompt"].startswith(search["prefix"] + " ") and request.target in search["prompt"]
            assert 0 < search["unet_passes"] <= QUICK["adversarial_budget"]
        first = request.adversarial[0]["prefix"]
        trained = [(step, p) for r, step, p in encoded if r == request.target and p.startswith(first + " ")]
        assert trained, f"the attack prompt of '{request.target}' never reached the trainable pass"
        assert min(step for step, _ in trained) == 2  # from the step of its search on, not before
    # each search counts as one step of the training bar, advanced as it spends: no bar sits still
    assert sum(phases.training_advances) == pytest.approx(2 * (QUICK["steps"] + searches_in(QUICK["steps"], 2)))
    assert any(0 < n < 1 for n in phases.training_advances)


def test_every_other_row_of_the_current_request_gets_an_attack_prefix(backend):
    rows = Batch(torch.zeros(3, 1), torch.zeros(3), ["a circle", "a circle", "old"], ["", "", ""], ["circle"] * 3,
                 torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))
    assert with_attack_prompts(rows, [], 2, 0) is rows
    step0 = with_attack_prompts(rows, ["x y", "z"], 2, 0)  # rows 0, 1 of step 0: only row 1 is odd
    assert step0.trained_prompts == ["a circle", "x y a circle", "old"] and step0.target_prompts == rows.target_prompts
    step1 = with_attack_prompts(rows, ["x y", "z"], 2, 1)  # rows 2, 3 of the request: row 3, the second prefix
    assert step1.trained_prompts == ["a circle", "z a circle", "old"]  # the replayed row 2 is never prefixed
    assert step1[slice(1, 2)].trained_prompts == ["z a circle"]


def _trained_deltas(edits) -> list[torch.Tensor]:
    """A request's trainable deltas, moved off zero as a few steps of training would."""
    params = edits.start_request(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return params


def test_search_changes_no_weight_or_gradient_and_honours_cancel(backend):
    """Both searches: the greedy one (the built-in vocabulary) and the gradient-guided one (back-propagating
    through the edited UNet to the token choices)."""
    request = requests_of(CONCEPTS)[0]
    text_encoder = {k: v.clone() for k, v in backend.text_encoder.state_dict().items()}
    before = host_weights(backend)
    with backend.edits(trainable_pattern("kv")) as edits:
        params = _trained_deltas(edits)
        trained = [p.detach().clone() for p in params]
        search = AdversarialSearch.start(backend, edits, request, tiny_config(adversarial_every=1, adversarial_budget=150),
                                         0, 8, Phases())
        for kind in ("greedy", "gradient"):
            search.attack.search, search.attack.candidates = kind, 4
            search.search(len(search.found) + 1, Phases())
            assert all(torch.equal(p, q) for p, q in zip(params, trained)) and all(p.grad is None for p in params)
        assert [f["search"] for f in search.found] == ["greedy", "gradient"]
        assert search.prefixes == [f["prefix"] for f in search.found]  # adversarial_prompts 2 keeps both
        search.attack.search = "gradient"
        with pytest.raises(UnlearnCancelled, match="attack search"):
            search.search(3, Phases(), cancel=lambda: True)
    assert_bit_identical(before, backend)
    assert all(torch.equal(v, text_encoder[k]) for k, v in backend.text_encoder.state_dict().items())


def test_host_model_unchanged_after_an_adversarial_run_and_after_cancel(backend):
    before = host_weights(backend)
    text_encoder = {k: v.clone() for k, v in backend.text_encoder.state_dict().items()}
    result = unlearn(backend, requests_of(CONCEPTS), tiny_config(**QUICK))
    assert all(r.adversarial for r in result.requests)
    assert_bit_identical(before, backend)
    calls = {"n": 0}

    def cancel():  # inside the first request, after its first search
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(UnlearnCancelled):
        unlearn(backend, requests_of(CONCEPTS), tiny_config(**QUICK), cancel=cancel)
    assert_bit_identical(before, backend)
    assert all(torch.equal(v, text_encoder[k]) for k, v in backend.text_encoder.state_dict().items())


def test_adversarial_runs_are_seeded(backend):
    a = unlearn(backend, requests_of(CONCEPTS)[:1], tiny_config(**QUICK))
    b = unlearn(backend, requests_of(CONCEPTS)[:1], tiny_config(**QUICK))
    plain = unlearn(backend, requests_of(CONCEPTS)[:1], tiny_config(steps=QUICK["steps"]))
    assert [f["prompt"] for f in a.requests[0].adversarial] == [f["prompt"] for f in b.requests[0].adversarial]
    assert all(torch.equal(a.total_delta[k], b.total_delta[k]) for k in a.total_delta)
    assert any(not torch.equal(a.total_delta[k], plain.total_delta[k]) for k in a.total_delta)  # it trains on them


@pytest.mark.parametrize("overrides, message", [
    ({"adversarial_every": -1}, "adversarial_every must be a whole number of at least 0"),
    ({"adversarial_every": 2.5}, "adversarial_every must be a whole number"),
    ({"adversarial_every": 2, "adversarial_budget": 0}, "adversarial_budget must be a whole number of at least 1"),
    ({"adversarial_every": 2, "adversarial_prompts": 0}, "adversarial_prompts must be a whole number of at least 1"),
    ({"adversarial_every": 2, "method": "esd-x"}, "adversarial_every is a setting of the DUGE method"),
    ({"adversarial_every": 2, "setting": "simultaneous"}, "simultaneous setting trains every request at once"),
    ({"adversarial_every": 2, "adversarial_attack": "textual"},
     "adversarial_attack must be one of prompt, inversion, got 'textual'"),
    ({"adversarial_attack": "both"}, "adversarial_attack must be one of prompt, inversion, got 'both'"),
])
def test_bad_adversarial_settings_are_refused_before_any_work(backend, overrides, message):
    before = host_weights(backend)
    with pytest.raises(DugeError, match=message):
        unlearn(backend, requests_of(CONCEPTS), tiny_config(**overrides))
    assert_bit_identical(before, backend)


def test_the_command_line_sets_adversarial_training():
    args = build_parser().parse_args(["unlearn", "--concepts", "c", "--out", "o", "--adversarial", "25",
                                      "--adversarial-budget", "300", "--adversarial-prompts", "3"])
    config = _unlearn_config(args)
    assert (config.adversarial_every, config.adversarial_budget, config.adversarial_prompts) == (25, 300, 3)
    assert config.adversarial_attack == "prompt"
    default = _unlearn_config(build_parser().parse_args(["unlearn", "--concepts", "c", "--out", "o"]))
    assert default.adversarial_every == 0
    args = build_parser().parse_args(["unlearn", "--concepts", "c", "--out", "o", "--adversarial", "25",
                                      "--adversarial-attack", "inversion"])
    assert _unlearn_config(args).adversarial_attack == "inversion"
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["unlearn", "--concepts", "c", "--out", "o", "--adversarial-attack", "textual"])


def test_a_checkpoints_inputs_hold_the_adversarial_settings_only_when_they_act():
    """Off, they cannot change the weights, so a checkpoint written before they existed still resumes."""
    concept_set = parse_concept_set(CONCEPTS)
    off = run_inputs("builtin", "x", tiny_config(adversarial_budget=7), concept_set)["config"]
    assert not any(k.startswith("adversarial_") for k in off)
    assert off == run_inputs("builtin", "x", tiny_config(), concept_set)["config"]
    on = run_inputs("builtin", "x", tiny_config(adversarial_every=2, adversarial_budget=7), concept_set)["config"]
    assert (on["adversarial_every"], on["adversarial_budget"]) == (2, 7)
    assert "adversarial_attack" not in on  # "prompt", what checkpoints written before the setting did
    inverted = run_inputs("builtin", "x", tiny_config(adversarial_every=2, adversarial_attack="inversion"), concept_set)
    assert inverted["config"]["adversarial_attack"] == "inversion"


# ---------------------------------------------------------------- against the concept inversion (adversarial_attack)

INVERSION = dict(QUICK, adversarial_attack="inversion")


def test_inversion_training_runs_records_its_searches_and_trains_the_learnt_rows(backend, monkeypatch):
    before = host_weights(backend)
    learnt = []  # (prompt, word) of every row given a learnt token
    real = duge.adversarial.learnt_token_row

    def spy(backend_, prompt, word, embedding, placeholder_id):
        learnt.append((prompt, word, embedding))
        return real(backend_, prompt, word, embedding, placeholder_id)

    monkeypatch.setattr(duge.adversarial, "learnt_token_row", spy)
    result = unlearn(backend, requests_of(CONCEPTS), tiny_config(**INVERSION))
    for request in result.requests:
        assert [s["step"] for s in request.adversarial] == [2, 4]
        for search in request.adversarial:
            assert search["attack"] == search["search"] == "inversion" and "<concept>" in search["prompt"]
            assert request.target not in search["prompt"].split()  # the name is what the token replaces
            assert 0 < search["unet_passes"] <= INVERSION["adversarial_budget"] and len(search["nearest_tokens"]) == 3
            assert search["objective_attacked"] == pytest.approx(search["objective_attacked"])  # a number, not NaN
    words = {r.target for r in result.requests}
    assert learnt and {w for _, w, _ in learnt} <= words | {a for r in requests_of(CONCEPTS) for a in r.aliases}
    assert all(e.shape == (backend.token_embedding_table().shape[1],) and not e.requires_grad for _, _, e in learnt)
    assert_bit_identical(before, backend)


def test_inversion_search_changes_no_weight_and_no_gradient_of_the_deltas(backend):
    """The inversion back-propagates through the edited UNet to its embedding: the deltas' `.grad` (holding
    a step's gradients) must come out as they went in."""
    request = requests_of(CONCEPTS)[0]
    before = host_weights(backend)
    with backend.edits(trainable_pattern("kv")) as edits:
        params = _trained_deltas(edits)
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        trained = [p.detach().clone() for p in params]
        config = tiny_config(adversarial_every=1, adversarial_budget=100, adversarial_attack="inversion",
                             adversarial_prompts=1)
        search = AdversarialSearch.start(backend, edits, request, config, 0, 8, Phases())
        search.search(1, Phases())
        search.search(2, Phases())
        assert all(torch.equal(p, q) for p, q in zip(params, trained))
        assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)
        assert len(search.embeddings) == 1 and not search.prefixes  # adversarial_prompts 1 keeps the last
        assert search.inputs.embeddings[0] is search.embeddings[0] and search.inputs.placeholder_id == search.placeholder_id
        table = backend.token_embedding_table().detach()
        start = table[candidate_token_ids(table, backend.special_token_ids())].float().mean(0)
        assert not torch.allclose(search.embeddings[0], start)  # Adam moved it from the vocabulary's mean
        assert search.found[-1]["unet_passes"] <= 100
        with pytest.raises(UnlearnCancelled, match="attack search"):
            search.search(3, Phases(), cancel=lambda: True)
    assert_bit_identical(before, backend)


def test_rows_trained_on_a_learnt_token_get_its_conditioning_and_its_attention_maps(backend, monkeypatch):
    prompts, words = ["a red circle and a red circle", "a red circle and a red circle", "a square"], \
        ["red circle", "red circle", "square"]
    rows = Batch(torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), prompts, ["", "", ""], words,
                 torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.bool),
                 torch.zeros(3, dtype=torch.bool))
    embedding = torch.randn(backend.token_embedding_table().shape[1], generator=torch.Generator().manual_seed(0))
    placeholder = 5
    assert with_attack_embeddings(backend, rows, [], placeholder, 2, 0) is rows
    attacked = with_attack_embeddings(backend, rows, [embedding], placeholder, 2, 0)  # row 1 of 0, 1 is odd
    assert attacked.learnt_tokens[0] is None and attacked.learnt_tokens[2] is None  # row 2: an earlier request's
    ids, position = replace_name_with_placeholder(backend.prompt_token_ids(prompts[1]),
                                                  backend.prompt_token_ids("red circle"), placeholder)
    expected = inverted_context(backend, ids, position, embedding)[0].detach()
    plain = backend.encode_prompts(prompts)
    tokens, mask = backend.token_indices(prompts, words)
    context, tokens_out, mask_out = learnt_conditioning(plain, tokens, mask, attacked.learnt_tokens)
    assert torch.equal(context[1], expected) and not torch.allclose(context[1], plain[1])
    assert torch.equal(context[0], plain[0]) and torch.equal(context[2], plain[2])
    # "a <placeholder> and a red circle": the placeholder at 2, the second mention moved to 5, 6
    assert tokens_out[1][mask_out[1]].tolist() == [2, 5, 6] and ids[2] == placeholder
    assert torch.equal(tokens_out[0][mask_out[0]], tokens[0][mask[0]])
    assert torch.equal(tokens_out[2][mask_out[2]], tokens[2][mask[2]])

    seen = {}

    class Seen(Exception):
        pass

    def capture(backend_, zt, t, context, tokens, mask, config, maps):  # what the trainable pass is given
        seen.update(context=context, tokens=tokens, mask=mask)
        raise Seen

    monkeypatch.setattr(duge.objective, "predict", capture)
    with pytest.raises(Seen):
        duge.objective.trainable_part(backend, attacked, slice(1, 3), tiny_config(), 1.0, None, [], None)
    assert torch.equal(seen["context"][0], expected) and torch.equal(seen["context"][1], plain[2])
    assert seen["tokens"][0][seen["mask"][0]].tolist() == [2, 5, 6]

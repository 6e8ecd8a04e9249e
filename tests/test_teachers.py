"""Teachers computed once per request, replay with equal weight per earlier request, and the
preservation regularisers inside the trainer (duge.teachers, duge.batches, duge.trainer)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from duge.backends.diffusers_backend import DiffusersBackend
from duge.batches import draw_batch, replay_requests
from duge.concepts import parse_concept_set, render_prompt, resolve_request
from duge.config import UnlearnConfig
from duge.edits import trainable_pattern
from duge.image_cache import build_request_cache
from duge.methods import get_method
from duge.objective import pooled_step_terms, step_terms
from duge.teachers import build_teacher_pool, draw_pool_rows, names_erased, request_pool
from duge.trainer import unlearn

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import CONCEPTS, requests_of, tiny_config  # noqa: E402
from trainer_helpers import assert_bit_identical, host_weights  # noqa: E402


@pytest.fixture(scope="module")
def backend(builtin_pipe):
    return DiffusersBackend(builtin_pipe, device="cpu", dtype="float32")


@pytest.mark.parametrize("earlier, rows", [(1, 4), (3, 4), (9, 4), (4, 4), (5, 1)])
def test_every_earlier_request_gets_the_same_replay_rows(earlier, rows):
    counts = Counter(r for step in range(earlier * 3) for r in replay_requests(earlier, rows, step))
    assert set(counts) == set(range(earlier))
    assert len(set(counts.values())) == 1  # equal weight over any whole number of cycles
    # and within every window of `earlier` consecutive steps
    for start in range(earlier):
        window = Counter(r for step in range(start, start + earlier) for r in replay_requests(earlier, rows, step))
        assert all(window[r] == rows for r in range(earlier))


def test_replayed_rows_of_a_step_follow_the_cycle(backend):
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config()
    method = get_method("duge")
    requests = [resolve_request(r, builtin_world=True) for r in concept_set.requests]
    circle, red = (build_request_cache(backend, r, config, 100 * k) for k, r in enumerate(requests))
    caches = [circle, red, red, circle]  # three earlier requests (circle, red, red), then the current one
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    replayed = Counter()
    for step in range(3):
        batch = draw_batch(backend, caches, method, config, rng, generator, replay=2, step=step)
        words = batch.target_words[config.batch_size:]
        assert len(words) == 2
        replayed.update("circle" if w in ("circle", "disc") else "red" for w in words)
    assert replayed == Counter({"circle": 2, "red": 4})  # 2 rows for each of the 3 earlier requests


def test_precomputed_teachers_give_the_same_loss_as_per_step_teachers(backend):
    """The same rows, once with the teachers run inside the step and once from a pool built on those rows."""
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config(batch_size=3, teacher_pool=3, beta=10.0, lambda_prior=1.0, lambda_reg=0.0)
    method = get_method("duge")
    request = resolve_request(concept_set.requests[0], builtin_world=True)
    cache = build_request_cache(backend, request, config, 0)

    with backend.edits(r"attn2\.to_[kv]$") as edits:
        edits.start_request(0)
        with torch.no_grad():  # a trained edit, so that the model differs from its teachers
            for d in edits.deltas.values():
                d.delta.normal_(0, 1e-2, generator=torch.Generator().manual_seed(2))
        # nothing committed: the reference (the model before this request) is θ0, the related rows' teacher
        pool = build_teacher_pool(backend, edits, cache, method, config, 3, np.random.default_rng(5),
                                  torch.Generator().manual_seed(5), erased={"circle", "disc"})
        per_step = step_terms(backend, edits, [cache], method, config, np.random.default_rng(5),
                              torch.Generator().manual_seed(5), None)
        # draw_pool_rows takes `batch_size` random rows of the pool: make them the pool's own rows in order
        pooled = pooled_step_terms(backend, edits, [pool], method, config, _InOrder(), None)
    assert pooled["output"] == pytest.approx(per_step["output"], rel=1e-5)
    assert pooled["attention"] == pytest.approx(per_step["attention"], rel=1e-5)
    # the prior term is a small difference of two predictions (1e-6 here); batching its rows into the same UNet
    # call as the anchor rows changes float32 rounding in the 5th digit
    assert pooled["prior"] == pytest.approx(per_step["prior"], rel=1e-3)
    assert pooled["total"] == pytest.approx(per_step["total"], rel=1e-5)
    assert per_step["output"] > 0 and per_step["attention"] > 0 and per_step["prior"] > 0


class _InOrder:
    """An rng whose `integers(0, n, size)` gives 0, 1, …, size−1 (the pool's rows in their order)."""

    def integers(self, low, high, size=None):
        return np.arange(size) if size is not None else 0


def test_pool_rows_are_the_same_rows_the_per_step_path_draws(backend):
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config(batch_size=3)
    method = get_method("duge")
    cache = build_request_cache(backend, resolve_request(concept_set.requests[1], builtin_world=True), config, 0)
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        pool = build_teacher_pool(backend, edits, cache, method, config, 3, np.random.default_rng(5),
                                  torch.Generator().manual_seed(5), erased={"red", "crimson"})
    batch = draw_batch(backend, [cache], method, config, np.random.default_rng(5), torch.Generator().manual_seed(5))
    assert torch.equal(pool.rows.zt, batch.zt.cpu()) and pool.rows.target_prompts == batch.target_prompts
    assert pool.target.shape == batch.zt.shape and len(pool.anchor_maps) == len(backend.cross_attention_layers())


@pytest.mark.parametrize("related_batch_size", [None, 2])
def test_a_step_draws_related_batch_size_related_rows(backend, related_batch_size):
    """Pooled or not, a step's prior term runs on `related_batch_size` related rows (unset: batch_size pooled,
    one per anchor and replayed row per step), while the pool keeps one related row per pool row."""
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config(batch_size=3, related_batch_size=related_batch_size)
    method = get_method("duge")
    cache = build_request_cache(backend, resolve_request(concept_set.requests[1], builtin_world=True), config, 0)
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        pool = build_teacher_pool(backend, edits, cache, method, config, 5, np.random.default_rng(5),
                                  torch.Generator().manual_seed(5), erased={"red", "crimson"})
    assert len(pool.rows.related_prompts) == len(pool.related_target) == 5
    drawn = draw_pool_rows([pool], config, np.random.default_rng(1), 0, 0, "cpu")
    expected = 3 if related_batch_size is None else related_batch_size
    assert len(drawn.rows.related_prompts) == len(drawn.related_target) == len(drawn.rows.related_t) == expected
    batch = draw_batch(backend, [cache, cache], method, config, np.random.default_rng(5), torch.Generator().manual_seed(5),
                       replay=1)
    assert len(batch.related_prompts) == len(batch.related_t) == (4 if related_batch_size is None else related_batch_size)


def test_related_prompts_naming_an_erased_concept_are_recognised():
    assert names_erased("a orange circle", {"circle"})
    assert not names_erased("a orange circles", {"circle"})
    assert names_erased("a painting by Van Gogh", {"van gogh"})
    assert not names_erased("a orange square", {"circle", "disc"})


@pytest.mark.parametrize("setting", ["sequential", "independent", "simultaneous"])
@pytest.mark.parametrize("overrides", [{"teacher_pool": 4}, {"regularizer": "projection"},
                                       {"regularizer": "penalty", "lambda_reg": 1e-3},
                                       {"teacher_pool": 4, "regularizer": "projection", "trainable_mode": "lora"}])
def test_pooled_teachers_and_preservation_train_in_every_setting(backend, setting, overrides):
    before = host_weights(backend)
    result = unlearn(backend, requests_of(CONCEPTS, setting), tiny_config(setting=setting, **overrides))
    assert_bit_identical(before, backend)
    assert any(float(d.abs().max()) > 0 for d in result.total_delta.values())


def test_trainer_projects_every_update_onto_the_null_space_of_c(backend, monkeypatch):
    """With a known C of rank 64 on every K/V layer and μ = 0 (the hard projector), each request's trained
    delta leaves the outputs of C's span unchanged (to 1e-6) while it moves those of the other directions."""
    import duge.preservation as preservation

    basis = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    kept, free = basis[:, :64], basis[:, 64:]  # C's span, its null space
    moment = kept @ kept.T * 2.0
    monkeypatch.setattr(preservation, "layer_moments", lambda widths, _: {n: moment for n, w in widths.items() if w == 128})
    config = tiny_config(regularizer="projection", projection_mu=0.0, learning_rate=5e-2)
    result = unlearn(backend, requests_of(CONCEPTS), config)
    for request in result.requests:
        for name, delta in request.delta.items():
            assert float((delta.double() @ kept).abs().max()) < 1e-6, name
        assert max(float((d.double() @ free).abs().max()) for d in request.delta.values()) > 1e-4


@pytest.mark.parametrize("kind", ["l2sp", "fisher", "penalty"])
def test_closed_form_regulariser_gradient_matches_autograd(kind):
    from duge.edits import DeltaWeight, LayerEdits
    from duge.losses import regularization_loss
    from duge.objective import regularization
    from duge.preservation import preservation_penalty, second_moment

    generator = torch.Generator().manual_seed(0)
    layer = DeltaWeight(torch.zeros(3, 4))
    layer.committed.normal_(generator=generator)
    layer.start_request()
    with torch.no_grad():
        layer.delta.normal_(generator=generator)
    edits = LayerEdits({"w": layer}, {"w": torch.zeros(3, 4)})
    fisher = {"w": torch.rand(3, 4, generator=generator)} if kind == "fisher" else None
    moments = {"w": second_moment(torch.randn(6, 4, generator=generator))}

    value = regularization(edits, kind, fisher, moments, weight=0.3)
    closed_form = layer.delta.grad.clone()
    layer.delta.grad = None
    expected = (preservation_penalty(layer.delta, moments["w"]) if kind == "penalty"
                else regularization_loss({"w": layer.total_delta()}, {"w": torch.zeros(())}, fisher))
    (0.3 * expected).backward()
    assert value == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(closed_form, layer.delta.grad, rtol=1e-5, atol=1e-7)


def _step_one_pass_per_prediction(backend, edits, batch, config):
    """DUGE's step terms with every prediction in a UNet call of its own, each term back-propagated on its
    own (the step as written in the design doc): the reference `step_terms`' merged passes must match."""
    from duge.losses import cross_attention_loss, prior_preservation_loss
    from duge.targets import predict

    ctx = backend.encode_prompts
    with torch.no_grad():
        with edits.reference():
            anchor, maps_anchor = predict(backend, batch.zt, batch.t, ctx(batch.anchor_prompts), batch.tok_anchor,
                                          batch.mask_anchor, config, True)
            related_reference = backend.predict_noise(batch.related_zt, batch.related_t, ctx(batch.related_prompts))
        with edits.disabled():
            direction = (backend.predict_noise(batch.zt, batch.t, ctx(batch.target_prompts))
                         - backend.predict_noise(batch.zt, batch.t, ctx(batch.anchor_prompts)))
    target = anchor - config.anchor_guidance * direction
    tokens, mask = backend.token_indices(batch.target_prompts, batch.target_words)
    pred, maps = predict(backend, batch.zt, batch.t, ctx(batch.target_prompts), tokens, mask, config, True)
    _, parts = cross_attention_loss(pred, target, maps, maps_anchor, config.beta)
    (parts["output"] + config.beta * parts["attention"]).backward()
    prior = prior_preservation_loss(backend.predict_noise(batch.related_zt, batch.related_t, ctx(batch.related_prompts)),
                                    related_reference)
    (config.lambda_prior * prior).backward()
    return {"output": float(parts["output"].detach()), "attention": float(parts["attention"].detach()),
            "prior": float(prior.detach())}


@pytest.mark.parametrize("committed", [False, True])
def test_a_steps_merged_unet_calls_give_the_loss_and_gradient_of_one_call_per_prediction(backend, committed):
    """`step_terms` runs the reference on the anchor and related rows in one UNet call, θ0 on the target and
    anchor prompts in one (or reuses ε_φ(anchor) when nothing is committed: φ is θ0), and one trainable pass
    with one backward: the same losses and gradients, to float32 rounding, as a pass per prediction."""
    concept_set = parse_concept_set(CONCEPTS)
    config = tiny_config(batch_size=3, beta=10.0, lambda_prior=1.0, lambda_reg=0.0)
    method = get_method("duge")
    cache = build_request_cache(backend, resolve_request(concept_set.requests[0], builtin_world=True), config, 0)
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        if committed:  # an earlier request's edit: the reference φ is no longer θ0
            edits.load_committed({name: torch.randn(d.committed.shape, generator=torch.Generator().manual_seed(3)) * 1e-2
                                  for name, d in edits.deltas.items()})
        assert edits.reference_is_original() is not committed
        params = edits.start_request(0)
        with torch.no_grad():  # a trained edit, so that the model differs from its teachers
            for d in edits.deltas.values():
                d.delta.normal_(0, 1e-2, generator=torch.Generator().manual_seed(2))
        merged = step_terms(backend, edits, [cache], method, config, np.random.default_rng(5),
                            torch.Generator().manual_seed(5), None)
        merged_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        batch = draw_batch(backend, [cache], method, config, np.random.default_rng(5), torch.Generator().manual_seed(5))
        separate = _step_one_pass_per_prediction(backend, edits, batch, config)
        separate_grads = [p.grad.clone() for p in params]
    for key in ("output", "attention", "prior"):
        assert merged[key] == pytest.approx(separate[key], rel=1e-4), key
    assert separate["output"] > 0 and separate["attention"] > 0 and separate["prior"] > 0
    for got, expected in zip(merged_grads, separate_grads):
        assert float((got - expected).norm()) <= 1e-4 * float(expected.norm())  # float32 rounding apart


# One request whose related prompts are "a square" and "a red square" (its first two templates).
CIRCLE_KEEPING_SQUARE = """
name: one
requests:
  - target: circle
    preserve: [square]
"""


def _start_deltas(backend, config):
    """A continued ComfyUI session's deltas before request 0 (a stand-in: small random ones), so that the model
    as the last request left it differs from θ0."""
    with backend.edits(trainable_pattern(config.trainable)) as edits:
        return {name: torch.randn(d.committed.shape, generator=torch.Generator().manual_seed(7)) * 3e-2
                for name, d in edits.deltas.items()}


@pytest.mark.parametrize("erased_before", [[], ["crimson"]])
def test_pooled_teachers_never_take_theta0_for_what_an_earlier_run_erased(backend, monkeypatch, erased_before):
    """A continued session whose earlier run erased red ("crimson", another of its names): the related row
    "a red square" is taught by the model as the session left it, not by θ0 (which still draws red);
    "a square" by θ0. Without `erased_before` both are θ0's."""
    import duge.trainer as trainer

    pools = []
    monkeypatch.setattr(trainer, "request_pool", lambda *a, **k: pools.append(request_pool(*a, **k)) or pools[-1])
    config = tiny_config(steps=1, teacher_pool=4, related_images=2)
    start = _start_deltas(backend, config)
    unlearn(backend, requests_of(CIRCLE_KEEPING_SQUARE), config, start_deltas=start, erased_before=erased_before)

    rows, taught = pools[0].rows, pools[0].related_target
    with torch.no_grad():
        context = backend.encode_prompts(rows.related_prompts)
        theta0 = backend.predict_noise(rows.related_zt, rows.related_t, context).float().cpu()
        with backend.edits(trainable_pattern(config.trainable)) as edits:
            edits.load_committed(start)
            with edits.reference():
                session = backend.predict_noise(rows.related_zt, rows.related_t, context).float().cpu()
    red = [names_erased(p, {"red"}) for p in rows.related_prompts]
    assert any(red) and not all(red), rows.related_prompts  # both kinds of related row were drawn
    for i, names_red in enumerate(red):
        expected = session if names_red and erased_before else theta0
        other = theta0 if expected is session else session
        assert torch.allclose(taught[i], expected[i], atol=1e-5), rows.related_prompts[i]
        assert float((taught[i] - other[i]).abs().max()) > 1e-3, rows.related_prompts[i]


@pytest.mark.parametrize("setting", ["sequential", "simultaneous"])
def test_preservation_keeps_what_an_earlier_run_erased_edited(backend, monkeypatch, setting):
    """regularizer=penalty in a run continuing one that erased red (named "crimson"): "red" and "crimson" in the
    request's templates are in the group whose outputs stay edited, and in no group kept as in θ0."""
    import duge.preservation as preservation

    groups = []
    built = preservation.run_preserved_prompts
    monkeypatch.setattr(preservation, "run_preserved_prompts",
                        lambda *a, **k: groups.append(built(*a, **k)) or groups[-1])
    requests = requests_of(CIRCLE_KEEPING_SQUARE, setting)
    unlearn(backend, requests, tiny_config(steps=1, regularizer="penalty", setting=setting),
            erased_before=["crimson"])

    prompts = groups[0]
    templates = requests[0].templates
    assert {render_prompt(t, name) for t in templates for name in ("red", "crimson")} <= set(prompts.erased)
    kept_as_theta0 = [*prompts.preserved, *prompts.never_erased, *prompts.vocabulary]
    assert not {"a red", "a crimson", "red", "crimson"} & set(kept_as_theta0)
    assert "a blue" in prompts.never_erased and "blue" in prompts.vocabulary  # never erased: kept as in θ0


@pytest.mark.parametrize("setting", ["sequential", "independent"])
def test_a_continued_session_keeps_its_earlier_deltas_in_every_setting(backend, monkeypatch, setting):
    """The deltas a continued session starts with stay in the result: independent requests each start from the
    model as the run found it (not θ0), and the total is those deltas plus every request's."""
    import duge.trainer as trainer

    config = tiny_config(steps=1, setting=setting)
    start = _start_deltas(backend, config)
    starts = []
    original = trainer.train_request

    def spy(run, *args, **kwargs):  # what is committed when each request's training starts
        starts.append(run.edits.committed())
        return original(run, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_request", spy)
    result = unlearn(backend, requests_of(CONCEPTS, setting), config, start_deltas=start)
    assert torch.allclose(starts[0][next(iter(start))], start[next(iter(start))])
    if setting == "independent":
        assert all(torch.allclose(s[name], start[name]) for s in starts for name in start)
    for name in start:
        expected = start[name] + sum(r.delta[name] for r in result.requests)
        assert torch.allclose(result.total_delta[name], expected, atol=1e-6), name

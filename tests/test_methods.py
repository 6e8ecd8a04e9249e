"""The baselines on small cases with known answers: UCE's closed form, and the loss each method
sums in `duge.objective.step_terms` (ESD-x's negative-guidance target, CA's output term alone,
FT + L2-SP, DUGE's three terms)."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from duge.concepts import ResolvedRequest, render_prompt
from duge.config import UnlearnConfig
from duge.image_cache import RequestCache
from duge.methods import METHODS, get_method
from duge.objective import step_terms
from duge.uce import slot_last_token, uce_closed_form, uce_delta, uce_embeddings


def _orthonormal(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :n].T  # [n, dim], orthonormal rows


def test_uce_maps_the_target_to_the_anchor_output_and_keeps_preserved_directions():
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target, anchor, kept_a, kept_b = _orthonormal(4, 8)
    w_new = uce_closed_form(w, target[None], anchor[None], torch.stack([kept_a, kept_b]), lamb=1e-9)
    torch.testing.assert_close(w_new @ target, w @ anchor)  # v* = W c_anchor
    torch.testing.assert_close(w_new @ kept_a, w @ kept_a)
    torch.testing.assert_close(w_new @ kept_b, w @ kept_b)


def test_uce_lambda_blends_the_edit_with_the_old_weight_and_leaves_unnamed_directions():
    # Orthonormal c: W_new c = (λ W c + s_e W a) / (λ + s_e); preserved and unnamed directions stay.
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target, anchor, kept, unnamed = _orthonormal(4, 6, seed=3)
    lamb, scale = 0.5, 2.0
    w_new = uce_closed_form(w, target[None], anchor[None], kept[None], lamb=lamb, erase_scale=scale)
    torch.testing.assert_close(w_new @ target, (lamb * w @ target + scale * w @ anchor) / (lamb + scale))
    torch.testing.assert_close(w_new @ kept, w @ kept)
    torch.testing.assert_close(w_new @ unnamed, w @ unnamed)


def test_uce_refuses_mismatched_pairs_and_an_unregularised_underdetermined_system():
    w = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="guide"):
        uce_closed_form(w, torch.ones(2, 4), torch.ones(1, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="λ must be positive"):
        uce_closed_form(w, torch.ones(1, 4), torch.ones(1, 4), torch.zeros(0, 4), lamb=0.0)


def test_uce_delta_on_the_builtin_model_moves_the_target_towards_the_anchor(builtin_pipe):
    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import ConceptRequest, resolve_request

    backend = DiffusersBackend(builtin_pipe, device="cpu")
    request = resolve_request(ConceptRequest("circle", preserve=["square"]), builtin_world=True)
    erase, guide, preserve = uce_embeddings(backend, [request])
    assert erase.shape == guide.shape
    # train_erase.py's token range: from the target's last token through end-of-text and padding
    length = backend.encode_prompts(["a circle"]).shape[1]
    expected_rows = 0
    for template in request.templates:
        anchor = slot_last_token(backend, template, "shape")
        expected_rows += sum(length - max(slot_last_token(backend, template, name), anchor) for name in ("circle", "disc"))
    assert erase.shape[0] == expected_rows
    first = backend.encode_prompts([render_prompt(request.templates[0], "circle")])[0]  # "a {}": BOS a circle EOS pad…
    anchor_first = backend.encode_prompts([render_prompt(request.templates[0], "shape")])[0]
    torch.testing.assert_close(erase[: length - 2], first[2:].float())
    torch.testing.assert_close(guide[: length - 2], anchor_first[2:].float())
    # preserved: every position of the anchor's and of square's prompts in every template
    assert preserve.shape[0] == 2 * length * len(request.templates)
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        weights_before = {n: w.detach().clone() for n, w in edits.originals.items()}
        deltas = uce_delta(backend, edits, [request], UnlearnConfig(method="uce"))
        assert set(deltas) == set(edits.deltas)
        for name, delta in deltas.items():
            w0 = edits.originals[name].double()
            w1 = w0 + delta.double()
            c, a, p = erase.double(), guide.double(), preserve.double()
            before = (c @ w0.T - a @ w0.T).norm()
            after = (c @ w1.T - a @ w0.T).norm()
            # (less than half-way: the preserved rows — the anchor prompt's own end-of-text and padding
            # positions among them, close to the target's — pull the other way; the optimum is checked next)
            assert after < 0.75 * before, name
            # W_new is the least-squares optimum: the objective's gradient vanishes there (λ = 0.5, scales 1)
            gradient = 0.5 * (w1 - w0) + (c @ w1.T - a @ w0.T).T @ c + (p @ w1.T - p @ w0.T).T @ p
            assert gradient.norm() < 1e-4 * (a @ w0.T).T.matmul(c).norm(), name
            # the kept concepts move less than the erased one does
            assert (p @ (w1 - w0).T).norm() / (p @ w0.T).norm() < (c @ (w1 - w0).T).norm() / (c @ w0.T).norm(), name
    for name, w in weights_before.items():  # θ0 itself is never written
        assert torch.equal(dict(builtin_pipe.unet.named_parameters())[name + ".weight"], w)


# ---------------------------------------------------------------- losses through step_terms


class _FakeEdits:
    """One scalar 'weight' delta d; the edited model adds d to every prediction."""

    def __init__(self, d: float):
        self.delta = torch.tensor(d, requires_grad=True)
        self.enabled = True

    @contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    # The reference model (frozen θ0, or θ0 + committed deltas): here without the request's d either way.
    reference = disabled

    def reference_is_original(self):  # nothing committed: the reference is θ0
        return True

    def total_deltas(self):
        return {"w": self.delta}

    @property
    def deltas(self):  # the one layer, as duge.edits.DeltaWeight shows it (a full delta, nothing committed)
        return {"w": SimpleNamespace(mode="full", delta=self.delta, total_delta=lambda: self.delta,
                                     request_delta=lambda: self.delta)}


class _FakeBackend:
    """ε(z, t, prompt) = code(prompt) (+ d when edited): '' → 1, target 'circle' → 3, anchor 'shape' → 2, 'square' → 5."""

    device = torch.device("cpu")
    num_train_timesteps = 1000

    def __init__(self, edits: _FakeEdits):
        self.edits = edits

    @staticmethod
    def _code(prompt: str) -> float:
        return 3.0 if "circle" in prompt else 2.0 if "shape" in prompt else 5.0 if "square" in prompt else 1.0

    def encode_prompts(self, prompts):
        return torch.tensor([self._code(p) for p in prompts]).view(-1, 1, 1)

    def token_indices(self, prompts, words, eos_fallback=False):
        return torch.zeros(len(prompts), 1, dtype=torch.long), torch.ones(len(prompts), 1, dtype=torch.bool)

    def add_noise(self, latents, noise, timesteps):
        return latents + noise

    def predict_noise(self, noisy, timesteps, context):
        out = torch.zeros_like(noisy) + context.view(-1, 1, 1, 1)
        return out + self.edits.delta if self.edits.enabled else out

    @contextmanager
    def capture_attention(self, layers, token_indices):
        class Store:
            maps: dict = {}

        yield Store()


def _losses(method: str, d: float = 0.5, **config) -> dict:
    edits = _FakeEdits(d)
    backend = _FakeBackend(edits)
    request = ResolvedRequest("circle", "shape", [], ["square"], ["a {}"], "object")
    latents = torch.zeros(2, 1, 2, 2)
    cache = RequestCache(request, latents, [0, 0], latents.clone(), ["a square", "a square"], target_latents=latents)
    cfg = UnlearnConfig(method=method, batch_size=2, **config)
    parts = step_terms(backend, edits, [cache], get_method(method), cfg, np.random.default_rng(0),
                       torch.Generator().manual_seed(0), None)  # back-propagates into edits.delta.grad
    return {"loss": parts["total"], "grad": float(edits.delta.grad), **parts}


def test_esd_x_steers_the_target_to_negative_guidance_of_the_frozen_model():
    # target: ε_φ(∅) − η (ε_φ(c) − ε_φ(∅)) = 1 − η·(3 − 1); prediction 3 + d
    for eta in (1.0, 2.0):
        out = _losses("esd-x", d=0.5, esd_eta=eta)
        expected = (3.5 - (1 - eta * 2)) ** 2
        assert out["output"] == pytest.approx(expected)
        assert out["loss"] == pytest.approx(expected)
        assert set(out) == {"loss", "grad", "output", "attention", "total"}


def test_duge_anchor_guidance_steers_away_from_the_target_along_the_unedited_models_direction():
    # target: ε_φ(anchor) − η (ε_θ0(c) − ε_θ0(anchor)) = 2 − η·(3 − 2); prediction 3 + d
    for eta in (0.0, 0.5, 1.0):
        out = _losses("duge", d=0.5, anchor_guidance=eta, beta=0.0, lambda_prior=0.0, lambda_reg=0.0)
        assert out["output"] == pytest.approx((3.5 - (2 - eta)) ** 2)
        assert out["grad"] == pytest.approx(2 * (3.5 - (2 - eta)))
    # the baselines keep their own targets
    assert _losses("ca", d=0.5, anchor_guidance=1.0)["output"] == pytest.approx((3.5 - 2.0) ** 2)


def test_concept_ablation_is_the_output_term_alone():
    out = _losses("ca", d=0.5, lambda_prior=3.0, lambda_reg=7.0, beta=9.0)
    assert out["output"] == pytest.approx((3.5 - 2.0) ** 2)  # target prompt → anchor's prediction
    assert out["attention"] == 0.0
    assert "prior" not in out and "regularization" not in out
    assert out["loss"] == pytest.approx(out["output"])
    assert out["grad"] == pytest.approx(2 * 1.5)


def test_ft_l2sp_adds_the_l2sp_penalty_to_the_output_term():
    out = _losses("ft-l2sp", d=0.5, lambda_reg=4.0, lambda_prior=3.0)
    assert out["regularization"] == pytest.approx(0.25)  # Σ (θ − θ0)² = d²
    assert "prior" not in out
    assert out["loss"] == pytest.approx(1.5**2 + 4.0 * 0.25)
    assert out["grad"] == pytest.approx(2 * 1.5 + 4.0 * 2 * 0.5)  # the regulariser's gradient 2λ(θ − θ0), closed form


def test_duge_sums_output_prior_and_regularisation():
    out = _losses("duge", d=0.5, lambda_prior=3.0, lambda_reg=4.0, anchor_guidance=0.0, regularizer="l2sp")
    assert out["prior"] == pytest.approx(0.25)  # related prompt: (5 + d − 5)²
    assert out["loss"] == pytest.approx(1.5**2 + 3.0 * 0.25 + 4.0 * 0.25)
    guided = _losses("duge", d=0.5, lambda_prior=3.0, lambda_reg=4.0, anchor_guidance=0.5,
                     regularizer="l2sp")  # target 2 − 0.5
    assert guided["loss"] == pytest.approx(2.0**2 + 3.0 * 0.25 + 4.0 * 0.25)


def test_every_method_in_the_table_is_covered_here():
    assert set(METHODS) == {"duge", "ca", "ft-l2sp", "esd-x", "uce", "uce-resolve"}


def test_slot_last_token_finds_the_word_in_its_slot_and_the_token_before_an_empty_one(builtin_pipe):
    from duge.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(builtin_pipe, device="cpu")
    assert slot_last_token(backend, "a {} shape", "red") == 2  # BOS a red
    assert slot_last_token(backend, "a {} shape", "") == 1  # the slot follows "a"
    assert slot_last_token(backend, "{} orange crescent", "") == 0  # the slot opens the template: BOS
    assert slot_last_token(backend, "a {} shape", "shape") == 2  # the slot's "shape", not the template's


def test_each_baseline_runs_with_its_papers_settings_and_without_replay():
    from duge.config import method_config

    esd = method_config("esd-x")
    assert (esd.trainable, esd.learning_rate, esd.steps, esd.batch_size, esd.esd_eta) == ("attn2", 1e-4, 500, 1, 1.0)
    for name in ("esd-x", "ca", "ft-l2sp", "uce", "uce-resolve"):
        assert method_config(name).replay_batch_size == 0, name
    from duge.methods import METHODS

    for name, spec in METHODS.items():  # every trained method says where the tuning grid starts
        assert (spec.objective == "closed_form") == (not spec.tuning_start), name
    uce = method_config("uce")
    assert (uce.uce_lambda, uce.uce_erase_scale, uce.uce_preserve_scale) == (0.5, 1.0, 1.0)
    assert method_config("duge") == UnlearnConfig()  # DUGE's defaults are UnlearnConfig's
    assert method_config("ca", learning_rate=1e-3).learning_rate == 1e-3  # what is given wins
    with pytest.raises(Exception, match="unknown setting"):
        method_config("ca", learning_rat=1e-3)

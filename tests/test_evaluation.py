"""Metrics on hand-made predictions: UA/IRA/CRA with a fake model and classifier, the harmonic
mean, the Fréchet distance on Gaussians with known answers, and the classifier interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duge.concepts import ConceptRequest, resolve_request
from duge.errors import DugeError
from duge.evaluation import (
    MissingClassifierError,
    ZeroShotClipClassifier,
    cumulative_metrics,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    harmonic_mean,
    measure_requests,
    per_request_metrics,
    require_classifier,
    unlearning_metrics,
    world_measured_concepts,
)
from duge.world.vocabulary import CONCEPTS


def _request(target: str):
    return resolve_request(ConceptRequest(target), builtin_world=True)


class _PromptModel:
    """A fake model and classifier pair: each 'image' carries the index of its prompt, and the
    classifier reads the concepts the prompt names — except those the model has 'erased' (read
    as `replacement`) and those it 'cannot draw' (read as `wrong`)."""

    def __init__(self, erased=(), cannot_draw=()):
        self.erased = {n for c in CONCEPTS if c.name in erased for n in c.names}
        self.cannot_draw = set(cannot_draw)
        self.prompts: list[str] = []
        self.calls: list[tuple[int, int]] = []  # (number of prompts, seed)

    def generate(self, prompts, seed):
        self.calls.append((len(prompts), seed))
        start = len(self.prompts)
        self.prompts += list(prompts)
        return torch.arange(start, start + len(prompts), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

    def predict(self, images):
        out = {"object": [], "colour": [], "style": []}
        defaults = {"object": "square", "colour": "pink", "style": "plain"}
        for index in images[:, 0, 0, 0].long().tolist():
            words = self.prompts[index].split()
            for kind in out:
                named = [c for c in CONCEPTS if c.kind == kind and any(n in words for n in c.names)]
                if named and not (set(named[0].names) & self.erased) and named[0].name not in self.cannot_draw:
                    out[kind].append(named[0].name)
                else:
                    out[kind].append(defaults[kind] if not named or named[0].name != defaults[kind] else "circle")
        return out


def test_ua_ira_cra_on_hand_made_predictions():
    model = _PromptModel(erased=["circle"], cannot_draw=["heart"])
    metrics = unlearning_metrics(model.generate, model, [_request("circle")], samples_per_prompt=2, retention_samples=3)
    assert metrics["UA"] == 1.0  # every paraphrase of circle/disc is read as something else
    assert metrics["UA_per_concept"] == {"circle": 1.0}
    assert "circle" not in metrics["accuracy_per_concept"]
    assert metrics["accuracy_per_concept"]["heart"] == 0.0
    assert metrics["IRA"] == pytest.approx(6 / 7)  # 7 objects kept, heart never right
    assert metrics["CRA"] == 1.0  # all 8 colours and 5 styles
    # 3 paraphrases × 2 names × 2 samples for UA, then 3 images per kept concept (20 concepts)
    assert model.calls[0] == (12, 0)
    assert len(model.calls) == 1 + 20 and all(n == 3 for n, _ in model.calls[1:])


def test_ua_is_zero_when_nothing_was_erased_and_cumulative_over_requests():
    model = _PromptModel(erased=["red"])
    requests = [_request("circle"), _request("red")]
    metrics = measure_requests(model.generate, model, requests, world_measured_concepts(), 1, 1)
    assert metrics["UA_per_concept"] == {"circle": 0.0, "red": 1.0}
    assert metrics["UA"] == 0.5
    assert metrics["last_request"]["UA"] == 1.0
    assert metrics["H"] == 0.0 or metrics["H"] == pytest.approx(harmonic_mean([0.5, metrics["IRA"], metrics["CRA"]]))


def test_cumulative_and_per_request_aggregation_of_per_concept_numbers():
    concepts = world_measured_concepts()
    accuracy = {c.name: 1.0 for c in CONCEPTS}
    accuracy.update({"square": 0.0, "orange": 0.5})  # every object but square, every colour but orange half
    ua = {"circle": 0.8, "red": 0.6}
    requests = [_request("circle"), _request("red")]
    cumulative = cumulative_metrics(ua, accuracy, requests, concepts)
    # circle: IRA over 7 objects (square 0) = 6/7; CRA over 7 colours (orange .5) + 5 styles = 11.5/12
    # red: IRA over 7 colours = 6.5/7; CRA over 7 objects + 5 styles = 11/12
    assert cumulative["UA"] == pytest.approx(0.7)
    assert cumulative["IRA"] == pytest.approx((6 / 7 + 6.5 / 7) / 2)
    assert cumulative["CRA"] == pytest.approx((11.5 / 12 + 11 / 12) / 2)
    assert cumulative["H"] == pytest.approx(harmonic_mean([cumulative["UA"], cumulative["IRA"], cumulative["CRA"]]))
    last = per_request_metrics(ua, accuracy, requests, concepts)
    assert last["UA"] == 0.6
    assert last["IRA"] == pytest.approx(6.5 / 7)
    assert last["CRA"] == pytest.approx(11 / 12)
    first = per_request_metrics(ua, accuracy, requests, concepts, index=0)
    assert first["UA"] == 0.8 and first["CRA"] == pytest.approx(11.5 / 12)  # red left out: it is erased


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0
    assert harmonic_mean([0.9, None, 1.0]) is None


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance_from_statistics(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected)


def test_frechet_distance_of_non_commuting_covariances_matches_the_eigenvalues_of_their_product():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = x @ x.T + 0.1 * np.eye(4), y @ y.T + 0.1 * np.eye(4)
    # tr sqrt(Σ1 Σ2) = Σ sqrt(eigenvalues of Σ1 Σ2): real and positive for two SPD matrices
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    got = frechet_distance_from_statistics(torch.zeros(4), torch.tensor(s1), torch.zeros(4), torch.tensor(s2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_between_feature_sets():
    square = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    mu, sigma = gaussian_statistics(square)
    torch.testing.assert_close(sigma, torch.eye(2, dtype=torch.float64) * 2 / 3)
    assert frechet_distance(square, square) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(square, square + torch.tensor([3.0, 0.0])) == pytest.approx(9.0)
    assert frechet_distance(square, 2 * square) == pytest.approx(2 * (2 / 3) * (1 - 2) ** 2)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(square[:1])


def test_a_model_outside_the_world_needs_a_classifier():
    with pytest.raises(MissingClassifierError, match="not a model of the built-in world"):
        require_classifier(False, None, "'my-model'")
    sentinel = object()
    assert require_classifier(False, sentinel) is sentinel


def test_measuring_a_target_the_classifier_cannot_name_says_which_labels_it_has():
    model = _PromptModel()
    request = resolve_request(ConceptRequest("Van Gogh"), builtin_world=False)
    with pytest.raises(DugeError, match="no label for 'Van Gogh'.*circle"):
        measure_requests(model.generate, model, [request], world_measured_concepts())


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A random-weight CLIP saved as transformers saves it, with the built-in world's tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from duge.world.model import BUILTIN_MODEL_DIR

    tokenizer = CLIPTokenizer.from_pretrained(BUILTIN_MODEL_DIR / "tokenizer", local_files_only=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_zero_shot_clip_classifier_from_a_local_folder(tiny_clip_folder):
    labels = {"object": ["circle", "square", "star"], "colour": {"red": ["a red shape"], "blue": ["a blue shape"]}}
    classifier = ZeroShotClipClassifier(tiny_clip_folder, labels)
    images = torch.rand(5, 3, 48, 48)
    predicted = classifier.predict(images)
    assert set(predicted) == {"object", "colour"}
    assert len(predicted["object"]) == 5 and set(predicted["object"]) <= {"circle", "square", "star"}
    assert set(predicted["colour"]) <= {"red", "blue"}
    features = classifier.embed(images)
    assert features.shape == (5, 16)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5))
    assert [c.name for c in classifier.concepts()] == ["circle", "square", "star", "red", "blue"]


def test_zero_shot_clip_classifier_refuses_what_is_not_a_local_folder(tmp_path):
    with pytest.raises(DugeError, match="does not exist"):
        ZeroShotClipClassifier("openai/clip-vit-base-patch32", {"object": ["circle"]})
    with pytest.raises(DugeError, match="does not exist"):
        ZeroShotClipClassifier(tmp_path, {"object": ["circle"]})


# ---------------------------------------------------------------- held-out measurement


def _every_training_prompt() -> set[str]:
    """Every prompt any request on the built-in world can train on: each default template of each kind
    filled with any name of any concept (targets, aliases, related images) or any anchor."""
    from duge.concepts import BUILTIN_WORLD_TEMPLATES, render_prompt
    from duge.world.vocabulary import GENERIC_WORD

    words = {n for c in CONCEPTS for n in c.names} | set(GENERIC_WORD.values())
    return {render_prompt(t, w) for templates in BUILTIN_WORLD_TEMPLATES.values() for t in templates for w in words}


def test_measuring_templates_and_prompts_are_held_out_from_every_training_template_and_prompt():
    from duge.concepts import BUILTIN_WORLD_TEMPLATES, render_prompt
    from duge.evaluation import PARAPHRASE_TEMPLATES, RETENTION_TEMPLATES, compositional_captions

    training_templates = {t for templates in BUILTIN_WORLD_TEMPLATES.values() for t in templates}
    measuring_templates = {t for ts in PARAPHRASE_TEMPLATES.values() for t in ts} | set(RETENTION_TEMPLATES.values())
    assert not measuring_templates & training_templates
    training = _every_training_prompt()
    concepts = world_measured_concepts()
    measuring = {c.retention_prompt for c in concepts}
    measuring |= {render_prompt(t, n) for c in concepts for t in c.paraphrase_templates for n in c.names}
    measuring |= {caption for caption, *_ in compositional_captions([c.name for c in CONCEPTS], 320)}
    assert len(measuring) > 300
    assert not measuring & training, sorted(measuring & training)[:5]
    from duge.evaluation import builtin_training_prompts

    assert builtin_training_prompts() == training  # what compositional_captions steers clear of


def test_compositional_captions_name_three_kept_concepts_and_are_read_right_only_when_all_three_are():
    from duge.evaluation import compositional_accuracy, compositional_captions

    kept = ["square", "heart", "orange", "cyan", "dotted", "plain"]
    captions = compositional_captions(kept, 6, seed=3)
    assert len(captions) == 6 and len({c for c, *_ in captions}) == 6
    for caption, o, c, s in captions:
        assert {o, c, s} <= set(kept) and all(w in caption.split() for w in (o, c, s))
    assert compositional_captions(["square", "orange"], 4) == []  # no style kept: nothing to measure
    model = _PromptModel()
    assert compositional_accuracy(model.generate, model, captions, 2) == 1.0
    model = _PromptModel(erased=("orange",))  # the captions with orange lose one kind of three
    with_orange = sum(c == "orange" for _, _, c, _ in captions)
    assert compositional_accuracy(model.generate, model, captions, 2) == pytest.approx(1 - with_orange / 6)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel_computed_pair_by_pair():
    from duge.evaluation import kernel_inception_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64) + 0.5
    k = lambda a, b: (float(a @ b) / 5 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert kernel_inception_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert kernel_inception_distance(x, y) == pytest.approx(kernel_inception_distance(y, x), rel=1e-10)
    y = y[:7]  # paired rows: the cross term leaves out each row's own partner
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    assert kernel_inception_distance(x, y, paired=True) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two():
    from duge.evaluation import kernel_inception_distance

    g = torch.Generator().manual_seed(1)
    same = [kernel_inception_distance(torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)) for _ in range(200)]
    shifted = [kernel_inception_distance(torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g) + 1.0)
               for _ in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))  # mean 0 within its standard error
    assert min(same) < 0  # unbiased: it can come out below zero
    assert min(shifted) > max(abs(np.mean(same)), 0) and np.mean(shifted) > 5 * np.std(same)
    with pytest.raises(ValueError):
        kernel_inception_distance(torch.randn(1, 8), torch.randn(4, 8))
    # pairs that share their noise (one seed, two nearly equal models) stay unbiased only when paired
    base = [torch.randn(16, 8, generator=g) for _ in range(200)]
    pairs = [(b, b + 0.05 * torch.randn(16, 8, generator=g)) for b in base]
    assert abs(np.mean([kernel_inception_distance(a, b, paired=True) for a, b in pairs])) < 0.05 * np.std(same)
    assert np.mean([kernel_inception_distance(a, b) for a, b in pairs]) < -2 * np.std(same) / np.sqrt(200)


def test_measurement_samples_in_batches_with_the_seeds_one_call_would_use():
    from duge.evaluation import EvaluationSettings, RunEvaluation

    class Backend:
        calls = []

        def generate(self, prompts, seed, steps, guidance):
            self.calls.append((len(prompts), seed))
            return torch.arange(seed, seed + len(prompts), dtype=torch.float32).view(-1, 1, 1, 1)

    backend = Backend()
    evaluation = RunEvaluation(backend, None, [], EvaluationSettings(batch=4))
    images = evaluation.generate(["p"] * 10, 100)
    assert images.view(-1).tolist() == list(range(100, 110))  # row i from seed 100 + i
    assert backend.calls == [(4, 100), (4, 104), (2, 108)]

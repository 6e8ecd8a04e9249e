"""Erasure and retention metrics (design doc §6) over a classifier interface.

A classifier maps images [B, 3, H, W] in [0, 1] to predicted concept names per kind; the
built-in world's evaluator is one, `ZeroShotClipClassifier` (a local CLIP folder) another.
Definitions, for the requests erased so far:

- UA (unlearning accuracy): over every erased concept, the share of images prompted with it —
  under each of its names and several paraphrasing templates — that the classifier does NOT
  read as that concept. Averaged over erased concepts.
- acc(c): for a concept c not erased, the share of images prompted with c alone that the
  classifier reads as c.
- IRA (in-domain retention): for each request, the mean acc over the non-erased concepts of the
  target's kind; averaged over requests.
- CRA (cross-domain retention): the same over the non-erased concepts of the other kinds.
- H: the harmonic mean of UA, IRA and CRA (0 when any of them is 0).
- compositional: for captions naming an object, a colour and a style none of which the run
  erases (held-out templates), the share of images read right in all three kinds.
- distance: KID (the unbiased MMD² of Bińkowski et al. with the cubic polynomial kernel) between
  the classifier's image features (the built-in evaluator's penultimate layer; CLIP's image
  embedding) of the edited model's samples and of the unedited model's samples, on the same
  prompts and seeds. Comparable between methods and requests of one benchmark, not with published
  KIDs (another network's features). `frechet_distance` is kept for callers who want FID's formula.
All but the distance are fractions in [0, 1]. "Cumulative" numbers are over every request so
far (the definitions above); "per request" numbers are those of one request: the UA of its
target, and the IRA/CRA over its target's kind, with every concept erased so far left out.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from .backends.base import Backend
from .concepts import BUILTIN_WORLD_TEMPLATES, ResolvedRequest, render_prompt
from .errors import DugeError
from .world.evaluator import WorldEvaluator, _to_evaluator_size, load_evaluator
from .world.model import EVALUATOR_PATH
from .world.vocabulary import CONCEPTS, CONCEPTS_BY_KIND, GENERIC_WORD


class ConceptClassifier(Protocol):
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Predicted canonical concept name per kind for each image."""


class FeatureClassifier(ConceptClassifier, Protocol):
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [B, D] for the distribution distance."""


class MissingClassifierError(DugeError):
    """A model outside the built-in world was to be measured without a classifier for it."""


# Measuring templates on the built-in world, held out from training: no template here is a training
# template (`duge.concepts.BUILTIN_WORLD_TEMPLATES`), and no prompt they make is a prompt any request
# trains on — a target's, its anchor's or a related image's (tests/test_evaluation.py checks all of
# them). They use the word orders of the world's captions with other fillers.
# UA: each erased concept under each of its names in each of these (other kinds named or not).
PARAPHRASE_TEMPLATES = {
    "object": ["an image of a {}", "the {} is orange and dotted", "a checkered pink {}"],
    "colour": ["an image of a {} shape", "the heart is {} and dotted", "a {} triangle that is checkered"],
    "style": ["an image of a {} shape", "the square is cyan and {}", "a green heart that is {}"],
}
# Retention (acc(c)): a concept alone, other kinds unnamed.
RETENTION_TEMPLATES = {"object": "an image of a {}", "colour": "an image of a {} shape", "style": "an image of a {} shape"}
# Compositional retention: object, colour and style named at once; all three must be read right.
COMPOSITIONAL_TEMPLATES = ("the {object} is {colour} and {style}", "a {colour} {object} that is {style}",
                           "an image of a {colour} {style} {object}")

# Paraphrases for concepts of a user's model (added to the request's own templates for UA).
GENERIC_PARAPHRASE_TEMPLATES = ("an image of {}", "a picture showing {}", "{}, highly detailed")


@dataclass
class WorldConcept:
    name: str
    kind: str
    names: tuple[str, ...]


@dataclass
class MeasuredConcept:
    """A concept the classifier can name: how to prompt for it alone and how to paraphrase it."""

    name: str  # the classifier's label
    kind: str
    names: tuple[str, ...]  # every name a prompt may use for it, `name` first
    retention_prompt: str  # a prompt naming this concept alone (for acc(c))
    paraphrase_templates: tuple[str, ...] = ()  # templates for UA (a request's own are added)


def world_concepts() -> list[WorldConcept]:
    return [WorldConcept(c.name, c.kind, c.names) for c in CONCEPTS]


def world_measured_concepts() -> list[MeasuredConcept]:
    """Every concept of the built-in world, prompted with the held-out measuring templates."""
    return [MeasuredConcept(c.name, c.kind, c.names, render_prompt(RETENTION_TEMPLATES[c.kind], c.name),
                            tuple(PARAPHRASE_TEMPLATES[c.kind])) for c in CONCEPTS]


def compositional_captions(kept: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """`n` captions (caption, object, colour, style) naming one object, colour and style from `kept`
    (canonical names), drawn without repeats when possible, fixed by `seed`, in COMPOSITIONAL_TEMPLATES."""
    pools = [[c.name for c in CONCEPTS_BY_KIND[kind] if c.name in kept] for kind in ("object", "colour", "style")]
    if not all(pools):
        return []
    training = builtin_training_prompts()
    candidates = []  # per triple, its captions in the templates that make no training prompt
    for o, c, s in ((o, c, s) for o in pools[0] for c in pools[1] for s in pools[2]):
        captions = [" ".join(t.format(object=o, colour=c, style=s).split()) for t in COMPOSITIONAL_TEMPLATES]
        candidates.append([(caption, o, c, s) for caption in captions if caption not in training])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(candidates)).tolist()
    out = []
    for i in range(n):  # triples in a random order, their templates in turn
        options = candidates[order[i % len(order)]]
        if options:
            out.append(options[(i // len(order) + i) % len(options)])
    return out


def builtin_training_prompts() -> frozenset[str]:
    """Every prompt a request on the built-in world can train on with the default templates: each
    template of each kind filled with any name of any concept (target, alias, related image) or anchor."""
    words = {n for c in CONCEPTS for n in c.names} | set(GENERIC_WORD.values())
    return frozenset(render_prompt(t, w) for ts in BUILTIN_WORLD_TEMPLATES.values() for t in ts for w in words)


def compositional_accuracy(generate: "Generate", classifier: "ConceptClassifier", captions, samples: int,
                           seed: int = 0) -> float | None:
    """The share of images of `captions` (compositional_captions) read right in all three kinds; None if none."""
    if not captions:
        return None
    prompts = [caption for caption, *_ in captions for _ in range(samples)]
    predicted = classifier.predict(generate(prompts, seed))
    hits = [predicted["object"][i] == o and predicted["colour"][i] == c and predicted["style"][i] == s
            for i, (_, o, c, s) in enumerate(entry for entry in captions for _ in range(samples))]
    return float(np.mean(hits))


def find_concept(word: str, concepts: Sequence[MeasuredConcept]) -> MeasuredConcept:
    """The concept one of whose names is `word` (case-insensitive); DugeError naming the labels if none."""
    key = " ".join(word.split()).lower()
    for concept in concepts:
        if key in (n.lower() for n in concept.names):
            return concept
    labels = ", ".join(c.name for c in concepts)
    raise DugeError(f"the classifier has no label for '{word}'; it can name: {labels}. "
                    "Add the concept to the classifier's labels to measure its erasure")


# ---------------------------------------------------------------- measuring images


Generate = Callable[[list[str], int], torch.Tensor]  # (prompts, seed) -> images [B, 3, H, W] in [0, 1]


def erasure_rates(generate: Generate, classifier: ConceptClassifier, erased: Sequence[ResolvedRequest],
                  concepts: Sequence[MeasuredConcept], samples_per_prompt: int = 4, seed: int = 0,
                  with_request_templates: bool = False) -> dict[str, float]:
    """UA of each erased concept: the share of its paraphrased prompts' images not read as it.

    Prompts: every paraphrase template × every name of the concept (and, with
    `with_request_templates`, the request's own templates and aliases too), `samples_per_prompt`
    images each, seeds from `seed`.
    """
    out = {}
    for request in erased:
        concept = find_concept(request.target, concepts)
        names = list(concept.names)
        templates = list(concept.paraphrase_templates)
        if with_request_templates:
            names = list(dict.fromkeys(names + [request.target, *request.aliases]))
            templates = list(dict.fromkeys(templates + list(request.templates)))
        prompts = [render_prompt(t, name) for t in templates for name in names]
        prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        predicted = classifier.predict(generate(prompts, seed))[concept.kind]
        out[concept.name] = float(np.mean([p != concept.name for p in predicted]))
    return out


def shown_prompts(erased: Sequence[ResolvedRequest], concepts: Sequence[MeasuredConcept],
                  preserved_per_request: int = 2) -> tuple[list[str], list[str]]:
    """Prompts whose measured images show a run's result, as `measure_requests` renders them: each erased
    concept's first UA prompt (its first paraphrase template with its first name), and the retention prompt of
    the first `preserved_per_request` preserved concepts of each request that the classifier knows (a preserved
    concept erased by another request is left out: its accuracy is not measured). Returns (targets' prompts,
    preserved concepts' prompts), each without repeats."""
    targets, preserved = [], []
    gone = {find_concept(r.target, concepts).name for r in erased}
    known = {n.lower(): c for c in concepts for n in c.names}
    for request in erased:
        concept = find_concept(request.target, concepts)
        template = concept.paraphrase_templates[0] if concept.paraphrase_templates else request.templates[0]
        targets.append(render_prompt(template, concept.names[0]))
        kept = [known[p.lower()] for p in request.preserve if p.lower() in known]
        preserved += [c.retention_prompt for c in kept if c.name not in gone][:preserved_per_request]
    return list(dict.fromkeys(targets)), list(dict.fromkeys(preserved))


def concept_accuracies(generate: Generate, classifier: ConceptClassifier, concepts: Sequence[MeasuredConcept],
                       samples: int = 8, seed: int = 0, skip: set[str] | frozenset = frozenset()) -> dict[str, float]:
    """acc(c) for every concept not in `skip`: the share of its retention prompt's images read as c.

    Concept i of `concepts` uses seeds from `seed + 1 + i`, whichever are skipped, so that a
    concept's images are the same in every measurement with the same `concepts` and `seed`.
    """
    accuracy = {}
    for i, concept in enumerate(concepts):
        if concept.name in skip:
            continue
        predicted = classifier.predict(generate([concept.retention_prompt] * samples, seed + 1 + i))[concept.kind]
        accuracy[concept.name] = float(np.mean([p == concept.name for p in predicted]))
    return accuracy


# ---------------------------------------------------------------- aggregating


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _kind_retention(kind: str, accuracy: Mapping[str, float], concepts: Sequence[MeasuredConcept],
                    erased_names: set[str]) -> tuple[float | None, float | None]:
    same = [accuracy[c.name] for c in concepts if c.kind == kind and c.name in accuracy and c.name not in erased_names]
    other = [accuracy[c.name] for c in concepts if c.kind != kind and c.name in accuracy and c.name not in erased_names]
    return (float(np.mean(same)) if same else None, float(np.mean(other)) if other else None)


def cumulative_metrics(ua_per_concept: Mapping[str, float], accuracy: Mapping[str, float],
                       erased: Sequence[ResolvedRequest], concepts: Sequence[MeasuredConcept]) -> dict:
    """UA, IRA, CRA and H over every request in `erased` (the module's definitions).

    `ua_per_concept` must hold every erased concept; `accuracy` may hold more concepts than
    are retained (e.g. the unedited model's, for all): erased ones are left out here.
    """
    erased_concepts = [find_concept(r.target, concepts) for r in erased]
    erased_names = {c.name for c in erased_concepts}
    ira, cra = [], []
    for concept in erased_concepts:
        same, other = _kind_retention(concept.kind, accuracy, concepts, erased_names)
        ira.append(same)
        cra.append(other)
    ua = _mean(ua_per_concept[name] for name in dict.fromkeys(c.name for c in erased_concepts))
    out = {"UA": ua, "IRA": _mean(ira), "CRA": _mean(cra)}
    out["H"] = harmonic_mean([out["UA"], out["IRA"], out["CRA"]])
    return out


def per_request_metrics(ua_per_concept: Mapping[str, float], accuracy: Mapping[str, float],
                        erased: Sequence[ResolvedRequest], concepts: Sequence[MeasuredConcept],
                        index: int = -1) -> dict:
    """UA, IRA, CRA and H of request `erased[index]` alone, every concept in `erased` left out of retention."""
    erased_names = {find_concept(r.target, concepts).name for r in erased}
    concept = find_concept(erased[index].target, concepts)
    same, other = _kind_retention(concept.kind, accuracy, concepts, erased_names)
    out = {"UA": ua_per_concept.get(concept.name), "IRA": same, "CRA": other}
    out["H"] = harmonic_mean([out["UA"], out["IRA"], out["CRA"]])
    return out


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of fractions in [0, 1]; 0 if any is 0, None if any is None (not measured)."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return float(len(values) / sum(1.0 / v for v in values))


def measure_requests(generate: Generate, classifier: ConceptClassifier, erased: Sequence[ResolvedRequest],
                     concepts: Sequence[MeasuredConcept], samples_per_prompt: int = 4, retention_samples: int = 8,
                     seed: int = 0, with_request_templates: bool = False) -> dict:
    """Cumulative UA/IRA/CRA/H after the requests `erased`, the last request's own numbers and the per-concept ones."""
    ua = erasure_rates(generate, classifier, erased, concepts, samples_per_prompt, seed, with_request_templates)
    erased_names = {find_concept(r.target, concepts).name for r in erased}
    accuracy = concept_accuracies(generate, classifier, concepts, retention_samples, seed, skip=erased_names)
    out = cumulative_metrics(ua, accuracy, erased, concepts) if erased else {"UA": None, "IRA": None, "CRA": None, "H": None}
    if erased:
        out["last_request"] = per_request_metrics(ua, accuracy, erased, concepts)
    out["UA_per_concept"] = ua
    out["accuracy_per_concept"] = accuracy
    return out


def unlearning_metrics(
    generate: Callable[[list[str], int], torch.Tensor],
    classifier: ConceptClassifier,
    erased: list[ResolvedRequest],
    samples_per_prompt: int = 4,
    retention_samples: int = 8,
    seed: int = 0,
) -> dict:
    """UA / IRA / CRA and per-concept numbers for a model of the built-in world.

    `generate(prompts, seed) -> images` samples the model being measured.
    """
    concepts = world_measured_concepts()
    metrics = measure_requests(generate, classifier, erased, concepts, samples_per_prompt, retention_samples, seed)
    return {key: metrics[key] for key in ("UA", "IRA", "CRA", "UA_per_concept", "accuracy_per_concept")}


def retention_ratios(metrics: dict, base: dict) -> dict:
    """IRA and CRA as fractions of the unedited model's values on the same requests."""
    out = {}
    for key in ("IRA", "CRA"):
        if metrics.get(key) is not None and base.get(key):
            out[f"{key}_ratio"] = metrics[key] / base[key]
    return out


# ---------------------------------------------------------------- distribution distance


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D], N ≥ 2."""
    x = torch.as_tensor(features).detach().to("cpu", torch.float64).reshape(len(features), -1)
    if x.shape[0] < 2:
        raise ValueError(f"gaussian_statistics: need at least 2 feature vectors, got {x.shape[0]}")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                                     sigma2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), in float64.

    tr((Σ1 Σ2)^½) is computed as tr((Σ1^½ Σ2 Σ1^½)^½), the same value, from symmetric
    eigendecompositions only (no scipy; negative round-off eigenvalues clamped to 0).
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t).to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return max(float(value), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features [N, D] (see the module doc)."""
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


@torch.no_grad()
def image_features(classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The classifier's features of images [B, 3, H, W] in [0, 1]: [B, D] float32 on the CPU.

    The built-in evaluator gives its penultimate layer (images resized as it reads them);
    another classifier must have `embed(images)`.
    """
    if isinstance(classifier, WorldEvaluator):
        classifier.eval()
        device = next(classifier.parameters()).device
        embed = lambda x: classifier.embed(_to_evaluator_size(x).to(device))  # noqa: E731
    elif hasattr(classifier, "embed"):
        embed = classifier.embed
    else:
        raise DugeError(f"{type(classifier).__name__} has no embed(images) method; the distribution distance "
                        "needs image features from the classifier")
    return torch.cat([embed(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, paired: bool = False) -> float:
    """KID (Bińkowski et al., ICLR 2018): the unbiased estimate of MMD² between two feature sets [m, D]
    and [n, D] (m, n ≥ 2) under the cubic polynomial kernel k(x, y) = (xᵀy / D + 1)³, in float64.

    Unbiased at any sample size (its expectation is the population MMD², 0 for equal distributions,
    so it can come out slightly negative), unlike the Fréchet distance, whose covariance from N images
    has rank at most N − 1. `paired`: row i of both sets comes from the same prompt and seed (the
    edited and the unedited model's image i); the cross term then leaves out the pairs i = i, which
    are not independent draws, so the estimate is the U-statistic over pairs (Gretton et al. 2012,
    MMD²_u with m = n) and stays unbiased.
    """
    x = torch.as_tensor(features_a).detach().to("cpu", torch.float64).reshape(len(features_a), -1)
    y = torch.as_tensor(features_b).detach().to("cpu", torch.float64).reshape(len(features_b), -1)
    m, n, dim = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2 or y.shape[1] != dim:
        raise ValueError(f"kernel_inception_distance: need two sets of at least 2 features of one size, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if paired and m != n:
        raise ValueError(f"kernel_inception_distance: paired sets must have as many rows, got {m} and {n}")
    kernel = lambda a, b: (a @ b.T / dim + 1) ** 3  # noqa: E731
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    cross = (k_xy.sum() - k_xy.diagonal().sum()) / (m * (m - 1)) if paired else k_xy.mean()
    return float(within_x + within_y - 2 * cross)


def distance_prompts(general_prompts: Sequence[str], samples: int) -> list[str]:
    """The prompts the distance is measured on: each general prompt `samples` times."""
    return [p for p in general_prompts for _ in range(samples)]


# ---------------------------------------------------------------- the measurement of a run


@dataclass
class MeasureSize:
    """How many images one measurement draws."""

    samples_per_prompt: int = 4  # UA: images per paraphrased prompt (prompts: templates × names)
    retention_samples: int = 8  # acc(c): images per concept
    compositional_samples: int = 1  # images per compositional caption
    distance_samples: int = 8  # images per general prompt for the distance (KID)


@dataclass
class EvaluationSettings:
    """How much to sample for each measurement (the same for every method of a benchmark).

    The measurement after the last request uses `final` sizes when given (the table's numbers),
    every other one the sizes here (the curve). Seeds start at `seed`; keep them apart from training
    seeds (the benchmark uses 10⁶ and up).
    """

    steps: int = 20  # sampler steps
    guidance: float = 7.5
    samples_per_prompt: int = 4
    retention_samples: int = 8
    distance_samples: int = 8
    compositional_samples: int = 1
    compositional_captions: int = 0  # captions of never-erased concepts for compositional retention (0: not measured)
    seed: int = 0
    final: MeasureSize | None = None
    batch: int = 32  # images per sampler call (0: all of a measurement's images at once)

    def size(self, final: bool) -> MeasureSize:
        if final and self.final is not None:
            return self.final
        return MeasureSize(self.samples_per_prompt, self.retention_samples, self.compositional_samples,
                           self.distance_samples)


@dataclass
class RunEvaluation:
    """The evaluate callback of `duge.trainer.unlearn`, with the unedited model's numbers.

    Call `measure_base(requests)` before unlearning (the backend's model unedited); then each
    call `(backend, requests_so_far)` returns cumulative UA/IRA/CRA/H, the last request's own
    numbers, per-concept numbers, compositional retention (on captions of concepts no request of the
    run erases), the distance (KID) to the unedited model's images of the general prompts (if given)
    and the seconds the measurement took. The call after the last of `measure_base`'s requests uses
    the settings' `final` sizes.
    """

    backend: object
    classifier: ConceptClassifier
    concepts: list[MeasuredConcept]
    settings: EvaluationSettings = field(default_factory=EvaluationSettings)
    general_prompts: list[str] = field(default_factory=list)
    with_request_templates: bool = False
    base: dict = field(default_factory=dict)
    _requests: int = 0
    _captions: list = field(default_factory=list)
    _base_features: dict = field(default_factory=dict)  # final: bool -> features [N, D]

    def generate(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Images of `prompts`, row i from seed `seed + i` (as one call would draw them), sampled
        `settings.batch` at a time: on a CPU a batch of 256 took 1.7× longer per image than one of 16."""
        size = self.settings.batch or len(prompts)
        return torch.cat([self.backend.generate(prompts[i : i + size], seed + i, self.settings.steps,
                                                self.settings.guidance) for i in range(0, len(prompts), size)])

    def _distance_features(self, size: MeasureSize, seed_offset: int = 0) -> torch.Tensor:
        prompts = distance_prompts(self.general_prompts, size.distance_samples)
        return image_features(self.classifier, self.generate(prompts, self.settings.seed + 50_000 + seed_offset))

    def _compositional(self, size: MeasureSize) -> float | None:
        return compositional_accuracy(self.generate, self.classifier, self._captions, size.compositional_samples,
                                      self.settings.seed + 70_000)

    def _measure_base_at(self, requests: Sequence[ResolvedRequest], size: MeasureSize, distance_floor: bool) -> dict:
        s = self.settings
        ua = erasure_rates(self.generate, self.classifier, requests, self.concepts, size.samples_per_prompt, s.seed,
                           self.with_request_templates)
        accuracy = concept_accuracies(self.generate, self.classifier, self.concepts, size.retention_samples, s.seed)
        compositional = self._compositional(size)
        prefixes = []
        for k in range(1, len(requests) + 1):
            entry = cumulative_metrics(ua, accuracy, requests[:k], self.concepts)
            entry["last_request"] = per_request_metrics(ua, accuracy, requests[:k], self.concepts)
            entry["compositional"] = compositional
            prefixes.append(entry)
        out = {"after_request": prefixes, "UA_per_concept": ua, "accuracy_per_concept": accuracy,
               "compositional": compositional, "size": asdict(size)}
        if self.general_prompts:
            features = self._distance_features(size)
            if distance_floor:
                out["distance_floor"] = kernel_inception_distance(features, self._distance_features(size, 10_000))
            out["features"] = features
        return out

    def measure_base(self, requests: Sequence[ResolvedRequest], distance_floor: bool = True) -> dict:
        """The unedited model at the curve's sizes and (when set) the final ones: acc of every concept, UA of
        every target, compositional retention and the numbers after each prefix of `requests`.

        `distance_floor`: also the KID between two sets of the unedited model's samples on different
        seeds — what re-drawing the images alone gives. (Edited and unedited samples share seeds.)
        Returns {"after_request": [...], ..., "final": {...} (the final sizes' numbers), "seconds"}.
        """
        t0 = time.perf_counter()
        self._requests = len(requests)
        erased = {find_concept(r.target, self.concepts).name for r in requests}
        self._captions = compositional_captions([c.name for c in self.concepts if c.name not in erased],
                                                self.settings.compositional_captions, self.settings.seed)
        curve = self._measure_base_at(requests, self.settings.size(False), distance_floor)
        self._base_features[False] = curve.pop("features", None)
        self.base = dict(curve)
        if self.settings.final is not None:
            final = self._measure_base_at(requests, self.settings.size(True), distance_floor)
            self._base_features[True] = final.pop("features", None)
            self.base["final"] = final
        self.base["compositional_captions"] = [caption for caption, *_ in self._captions]
        self.base["seconds"] = time.perf_counter() - t0
        return self.base

    def measure_base_from(self, requests: Sequence[ResolvedRequest], base: dict, features: dict) -> None:
        """Take a `measure_base` result measured before (same model, requests and settings) instead of
        measuring again; `features`: {final (bool): the unedited model's distance features}."""
        self._requests = len(requests)
        erased = {find_concept(r.target, self.concepts).name for r in requests}
        self._captions = compositional_captions([c.name for c in self.concepts if c.name not in erased],
                                                self.settings.compositional_captions, self.settings.seed)
        self.base = base
        self._base_features = dict(features)

    def __call__(self, backend: Backend, requests_so_far: Sequence[ResolvedRequest]) -> dict:
        """The current model's numbers (`backend` is the one this evaluation samples, as unlearn passes it)."""
        t0 = time.perf_counter()
        s = self.settings
        final = s.final is not None and len(requests_so_far) == self._requests
        size = s.size(final)
        metrics = measure_requests(self.generate, self.classifier, requests_so_far, self.concepts,
                                   size.samples_per_prompt, size.retention_samples, s.seed, self.with_request_templates)
        metrics["compositional"] = self._compositional(size)
        if self._base_features.get(final) is not None:
            # the same prompts and seeds as the unedited model's images: paired rows
            metrics["distance"] = kernel_inception_distance(self._distance_features(size), self._base_features[final],
                                                            paired=True)
        base = self.base.get("final") if final else self.base
        if base and base.get("after_request"):
            metrics.update(retention_ratios(metrics, base["after_request"][len(requests_so_far) - 1]))
        metrics["measure_size"] = asdict(size)
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics


def require_classifier(builtin_world: bool, classifier: ConceptClassifier | None, model: str = "the model"):
    """The classifier to measure `model` with: the given one, else the built-in evaluator on the
    built-in world; MissingClassifierError for another model without one."""
    if classifier is not None:
        return classifier
    if builtin_world:
        return load_evaluator(EVALUATOR_PATH)
    raise MissingClassifierError(
        f"{model} is not a model of the built-in world, so the built-in evaluator cannot read its images; "
        "to measure UA/IRA/CRA give a classifier for its concepts, e.g. "
        "ZeroShotClipClassifier('path/to/local/clip-folder', {'artist': ['Van Gogh', 'Monet', ...]}) "
        "(any object with predict(images) -> {kind: [names]} works), or run without measuring"
    )


def concepts_for(classifier: ConceptClassifier, builtin_world: bool) -> list[MeasuredConcept]:
    """The concepts a measurement covers: the world's, or those the classifier declares (`concepts()`)."""
    if hasattr(classifier, "concepts"):
        return list(classifier.concepts())
    if builtin_world:
        return world_measured_concepts()
    raise DugeError(f"{type(classifier).__name__} does not say which concepts it can name; give it a "
                    "concepts() method returning duge.evaluation.MeasuredConcept entries")


# ---------------------------------------------------------------- a user's classifier


class ZeroShotClipClassifier:
    """CLIP zero-shot classification from a local folder (transformers `CLIPModel` + `CLIPProcessor`).

    `labels`: {kind: {concept name: [text prompts]}} or {kind: [concept names]} (then each name is
    read through `templates`). An image's label per kind is the concept whose mean normalised
    text embedding has the highest cosine similarity with the image embedding. `embed(images)`
    returns the normalised image embeddings (the distance's features). Nothing is downloaded:
    the folder must exist and is loaded with `local_files_only=True`.
    """

    DEFAULT_TEMPLATES = ("a photo of {}", "an image of {}", "{}")

    def __init__(self, model_dir: str | Path, labels: Mapping[str, Mapping[str, Sequence[str]] | Sequence[str]],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor  # deferred: transformers' CLIP, only for this classifier

        folder = Path(model_dir).expanduser()
        if not (folder.is_dir() and (folder / "config.json").exists()):
            raise DugeError(f"CLIP classifier folder '{model_dir}' does not exist or has no config.json; expected a "
                            "local folder saved by transformers (CLIPModel.save_pretrained + CLIPProcessor.save_pretrained)")
        if not labels or any(not names for names in labels.values()):
            raise DugeError("ZeroShotClipClassifier: labels must name at least one concept per kind, "
                            "e.g. {'artist': ['Van Gogh', 'Monet']}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # transformers raises many kinds for a broken folder
            raise DugeError(f"could not load a CLIP model and processor from '{folder}': {err}") from err
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.prompts: dict[str, dict[str, list[str]]] = {}
        for kind, entries in labels.items():
            if isinstance(entries, Mapping):
                self.prompts[kind] = {name: list(p) or [name] for name, p in entries.items()}
            else:
                self.prompts[kind] = {name: [render_prompt(t, name) for t in templates] for name in entries}
        self._text = {kind: self._text_embeddings(entries) for kind, entries in self.prompts.items()}

    @torch.no_grad()
    def _text_embeddings(self, entries: Mapping[str, list[str]]) -> torch.Tensor:
        rows = []
        for prompts in entries.values():
            tokens = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
            emb = _as_embedding(self.model.get_text_features(**tokens.to(self.device)))
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.stack(rows)  # [concepts, D]

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> CLIP's input: resized to its crop size, normalised."""
        proc = self.processor.image_processor
        h, w = _height_width(getattr(proc, "crop_size", None) or getattr(proc, "size", None) or 224)
        x = torch.nn.functional.interpolate(images.float().to(self.device), size=(h, w), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(proc.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(proc.image_std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            emb = _as_embedding(self.model.get_image_features(pixel_values=self._pixels(images[i : i + self.batch_size])))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        feats = self.embed(images)
        out = {}
        for kind, text in self._text.items():
            names = list(self.prompts[kind])
            out[kind] = [names[i] for i in (feats @ text.T.cpu()).argmax(-1).tolist()]
        return out

    def concepts(self) -> list[MeasuredConcept]:
        """Every label as a concept: retained prompt "a photo of {name}", the generic paraphrases for UA."""
        return [MeasuredConcept(name, kind, (name,), render_prompt("a photo of {}", name), GENERIC_PARAPHRASE_TEMPLATES)
                for kind, entries in self.prompts.items() for name in entries]


def _height_width(size) -> tuple[int, int]:
    """(height, width) from an image processor's size: an int, a dict or transformers' SizeDict."""
    if isinstance(size, int):
        return size, size
    get = (lambda k: size.get(k)) if isinstance(size, Mapping) else (lambda k: getattr(size, k, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    edge = get("shortest_edge")
    if edge:
        return int(edge), int(edge)
    raise DugeError(f"cannot read the CLIP image size from {size!r}; expected height/width or shortest_edge")


def _as_embedding(output) -> torch.Tensor:
    """transformers returns a tensor, or (in newer versions) an output object holding the pooled embedding."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise DugeError(f"unexpected CLIP output {type(output).__name__}; expected a tensor of embeddings")


__all__ = [
    "ConceptClassifier", "FeatureClassifier", "MissingClassifierError", "MeasuredConcept", "WorldConcept",
    "EvaluationSettings", "RunEvaluation", "ZeroShotClipClassifier", "PARAPHRASE_TEMPLATES",
    "world_concepts", "world_measured_concepts", "find_concept", "erasure_rates", "concept_accuracies",
    "cumulative_metrics", "per_request_metrics", "harmonic_mean", "measure_requests", "unlearning_metrics",
    "retention_ratios", "gaussian_statistics", "frechet_distance", "frechet_distance_from_statistics",
    "image_features", "distance_prompts", "require_classifier", "concepts_for", "kernel_inception_distance",
    "compositional_captions", "compositional_accuracy", "MeasureSize", "RETENTION_TEMPLATES",
    "COMPOSITIONAL_TEMPLATES",
]

"""Continual unlearning on the built-in world: DUGE beside faithful baselines, request after request.

Every method (duge, esd-x, ca, ft-l2sp, uce, uce-resolve) runs the requests of a reported sequence
(`sequence10`, `sequence10b`) in the sequential setting, from the same unedited model, with its own
settings (`duge.methods`: a baseline's paper settings; with `--tuned`, what the tuning protocol
chose), for each training seed, and is measured after every request by the same evaluation
(duge.evaluation): UA, IRA, CRA, their harmonic mean H, compositional retention and KID to the
unedited model on the set's general prompts. Measuring prompts are held out from every training
prompt; measuring seeds (10⁶ and up) are apart from training seeds. The anchor images are not
filtered by any evaluator (training a second evaluator costs ~36 min of one core here; the one
that measures must not choose the training images). The unedited model is measured once per
sequence and evaluation settings, and kept on disk (`--cache`) for every later method, seed or part.

Sizes: after the last request UA reads 48 images per erased concept (3 templates × 2 names × 8),
retention 16 per concept, compositional retention 48 images (24 captions × 2), KID 256 images per
side (8 general prompts × 32); after the other requests 12, 4, 24 and 64 (the curve).

Tables give the mean over training seeds ± the 95 % confidence half-width (t-distribution,
n − 1 degrees of freedom) and, per baseline, whether its final H differs from DUGE's (paired t-test
over seeds, two-sided 5 %). A closed form (uce, uce-resolve) draws nothing random: it runs once, at the
first training seed, and that run is paired with each of DUGE's seeds (sequence10's three runs of each were
identical to the last digit). Cost: seconds per request (caching + training) and per step, as ratios
to ESD-x's from the same run — run one method at a time, or each process with one torch thread.

Tuning (`--tune`): on the `tuning` sequence (not a reported one), every method gets four runs
(LR_FACTORS and UCE_GRID below); the highest final H decides.

Attacks (`--attack prompt|inversion|both`, off unless asked): after each method's last request, in the
same process, its model is attacked on every erased concept (`duge.attacks`: the prompt search and/or
the concept inversion) with one AttackConfig for every method and seed — duge/config.py's defaults
(--quick: QUICK_ATTACK), --attack-budget the only override, all fixed before any result is seen —
and the objectives' images drawn once by the unedited model. As a sanity row the unedited model is
attacked the same way (kept in --cache); its attacks' images must show the concept (share >= 0.9).
The post-attack UA (per concept the lowest of the plain prompt's and each attack's) is reported per
method, mean ± 95 % CI over seeds. Cost: ~1-2 min of one core per concept and attack at the default
budget, for every method and seed, i.e. sequence10's ten concepts add ~30 min per run.
`--save-deltas` keeps each run's final edit (θ − θ0 of the edited layers, safetensors, < 1 MB) in
OUT/deltas, and `--attach continual.json --attack both` attacks those saved edits later and writes the
result with the attacks attached (for runs made without --attack).

    python benchmarks/continual.py [--quick] [--sequence sequence10] [--methods duge,uce] [--seeds 0,1,2]
                                   [--tuned benchmarks/results/tuning/tuning.json] [--out DIR] [--set [METHOD:]FIELD=VALUE]
    python benchmarks/continual.py --tune [--methods ...] --out benchmarks/results/tuning
    python benchmarks/continual.py --merge a/continual.json b/continual.json --out DIR
    python benchmarks/continual.py [...] --attack both [--attack-budget N] [--save-deltas]
    python benchmarks/continual.py --attach DIR/continual.json [--deltas DIR/deltas] --attack both --out DIR2

Writes DIR/continual.json (or tuning.json), DIR/table.md, DIR/erosion.png and DIR/cost.png.
--quick: the first 3 requests of the sequence, few steps and samples (CI).
--sequence method_tuning10 (benchmarks/tuning/): a sequence for choosing DUGE's own settings, never reported;
measured only after its last request, at the tuning protocol's sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attack import SANITY_SHARE, SharedAttacks  # noqa: E402
from benchmarks.peak_memory import PeakMemory  # noqa: E402
from duge.methods import METHODS as METHOD_TABLE  # noqa: E402
from duge.paths import atomic_write_text  # noqa: E402

METHODS = tuple(METHOD_TABLE)
REPORTED_SEQUENCES = ("sequence10", "sequence10b")
TUNING_SEQUENCE = "tuning"
# Sequences for choosing DUGE's own settings (never reported; run with the TUNING profile): benchmarks/tuning/
METHOD_TUNING_DIR = Path(__file__).resolve().parent / "tuning"
METHOD_TUNING_SEQUENCES = tuple(sorted(p.stem for p in METHOD_TUNING_DIR.glob("*.yaml")))
EVAL_SEED = 1_000_000
KEYS = ("UA", "IRA", "CRA", "H", "compositional", "distance", "IRA_ratio", "CRA_ratio")

# The tuning protocol: four runs per method, the same for every method (DUGE included).
# Gradient methods: learning rate r, 10·r and 100·r at the reference steps S, then the best of those
# at S/2. r and S are each method's reference (duge.methods: the paper's, or DUGE's/FT's defaults).
# The grid never goes below a paper's learning rate (tuned for Stable Diffusion, not this small
# model) and reaches the 2e-3 region the earlier benchmark ran every method at; for DUGE and FT it
# only goes up from their defaults, which can only cost them.
# Closed forms (UCE): λ ∈ {0.1, 0.5} (edit_model's default, train_erase.py's call) × preserve scale
# ∈ {0.1, 1} (train_erase.py's and uce_sd_erase.py's defaults), erase scale 1.
LR_FACTORS = (1.0, 10.0, 100.0)
UCE_GRID = tuple({"uce_lambda": lamb, "uce_preserve_scale": scale} for lamb in (0.5, 0.1) for scale in (0.1, 1.0))
GRID_RUNS = 4  # runs per method: len(LR_FACTORS) + 1 (the best at S/2), or len(UCE_GRID)
# --quick --attack: AttackConfig fields for a CI-sized attack (every other field AttackConfig's default).
QUICK_ATTACK = {"budget": 300, "objective_images": 2, "eval_images": 4, "sample_steps": 8}
ATTACK_KEYS = ("UA_plain", "UA_prompt", "UA_inversion", "post_attack_UA")


@dataclass
class Profile:
    """Everything a benchmark run samples and trains; --quick and the full run differ only here."""

    requests: int | None = None  # None: the whole sequence
    steps: int | None = None  # None: the method's own
    anchor_images: int | None = None
    related_images: int | None = None
    sampler_steps: int | None = None
    batch_size: int | None = None  # None: the method's own
    eval_steps: int = 10
    samples_per_prompt: int = 2  # the curve's sizes (see duge.evaluation.EvaluationSettings)
    retention_samples: int = 4
    compositional_samples: int = 1
    distance_samples: int = 8
    compositional_captions: int = 24
    final_samples_per_prompt: int = 8  # after the last request
    final_retention_samples: int = 16
    final_compositional_samples: int = 2
    final_distance_samples: int = 32
    measure_every_request: bool = True  # False: only after the last request (tuning)
    config_overrides: dict = field(default_factory=dict)


FULL = Profile()
QUICK = Profile(requests=3, steps=12, anchor_images=4, related_images=1, sampler_steps=8, batch_size=2, eval_steps=6,
                samples_per_prompt=1, retention_samples=1, distance_samples=2, compositional_captions=4,
                final_samples_per_prompt=1, final_retention_samples=2, final_compositional_samples=1,
                final_distance_samples=2)
TUNING = replace(FULL, measure_every_request=False, final_samples_per_prompt=4, final_retention_samples=8,
                 final_distance_samples=8)


# ---------------------------------------------------------------- statistics

# Two-sided 95 % quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96


def mean_ci(values) -> tuple[float | None, float | None, int]:
    """(mean, 95 % half-width over the values with the t-distribution — None for one value, n)."""
    values = [v for v in values if v is not None]
    n = len(values)
    if not n:
        return None, None, 0
    mean = sum(values) / n
    if n < 2:
        return mean, None, n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * sd / math.sqrt(n), n


def paired_difference(a: dict, b: dict) -> dict | None:
    """a − b over the seeds both have ({seed: value}): mean, 95 % half-width, and significant (CI excludes 0)."""
    seeds = sorted(set(a) & set(b), key=int)
    diffs = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    mean, half, n = mean_ci(diffs)
    if mean is None:
        return None
    return {"mean": mean, "ci95": half, "n": n, "significant": half is not None and abs(mean) > half}


# ---------------------------------------------------------------- running


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a `git archive` copy: the commit it was made from, if written
        stamp = root / "SNAPSHOT_COMMIT"
        return f"{stamp.read_text().strip()} (git archive)" if stamp.exists() else None
    return commit + ("+uncommitted" if dirty else "")


def _unlearn_config(method: str, profile: Profile, seed: int, tuned: dict | None = None):
    """The method's own config (duge.methods.method_config), the tuned choice, the profile's sizes,
    then `config_overrides` ("field" or "method:field")."""
    from duge.config import method_config

    config = method_config(method, seed=seed, **((tuned or {}).get(method) or {}))
    for name in ("steps", "anchor_images", "related_images", "sampler_steps", "batch_size"):
        value = getattr(profile, name)
        if value is not None:
            setattr(config, name, value)
    for key, value in profile.config_overrides.items():
        only, _, name = key.rpartition(":")
        if only and only != method:
            continue
        setattr(config, name, value)
    config.validate()
    return config


def parse_overrides(items: list[str]) -> dict:
    """["lambda_reg=0.01", "duge:beta=10"] -> {"lambda_reg": 0.01, "duge:beta": 10} (values read as JSON, else text)."""
    from duge.config import UnlearnConfig

    fields = set(UnlearnConfig.__dataclass_fields__)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        name = key.rpartition(":")[2]
        if not sep or name not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE or METHOD:FIELD=VALUE with FIELD one of "
                             + ", ".join(sorted(fields)))
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def _median(values):
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run_method(config, backend, concept_set, evaluation, memory: PeakMemory, measure_every_request: bool = True,
               log=print, on_request=None, after_last=None) -> dict:
    """One method and seed through every request: its metrics after each (or after the last), its cost,
    or the error that stopped it. `on_request(partial_entry)` sees what is known after each measurement;
    `after_last(result, entry)` the finished run (`UnlearnResult`) and its entry, to add to it."""
    from duge.concepts import resolve_concept_set
    from duge.errors import DugeError
    from duge.trainer import unlearn

    step_times: dict[str, list[float]] = {}
    peaks: list = []
    partial: dict = {"config": asdict(config), "unfinished": True, "requests": []}
    total = len(concept_set.requests)

    def progress(info):
        step_times.setdefault(info["request"], []).append(time.perf_counter())

    def evaluate(b, requests_so_far):
        peaks.append((memory.peak_mb(), memory.peak_mb() - memory.start_mb))
        if not measure_every_request and len(requests_so_far) < total:
            log(f"  {config.method:<11} seed {config.seed} request {len(requests_so_far):>2} "
                f"({requests_so_far[-1].target}): trained at {time.perf_counter() - t0:.0f} s; measured after request {total}")
            memory.reset()
            return {}
        metrics = evaluation(b, requests_so_far)
        log(f"  {config.method:<11} seed {config.seed} request {len(requests_so_far):>2} ({requests_so_far[-1].target}): "
            + " ".join(f"{k} {_fmt(metrics.get(k))}" for k in ("UA", "IRA", "CRA", "compositional"))
            + f" KID {_fmt(metrics.get('distance'), 4)}")
        partial["requests"].append({"index": len(requests_so_far), "target": requests_so_far[-1].target,
                                    **{k: metrics.get(k) for k in KEYS}})
        if on_request:
            on_request(partial)
        memory.reset()
        return metrics

    entry: dict = {"config": asdict(config), "git_commit": git_commit(), "requests": []}
    t0 = time.perf_counter()
    memory.reset()
    try:
        result = unlearn(backend, resolve_concept_set(concept_set, True, config.setting), config,
                         concept_set.general_prompts, image_filter=None, evaluate=evaluate, progress=progress)
    except DugeError as err:  # a diverged run is a result, not a crash of the benchmark
        entry["error"] = f"{type(err).__name__}: {err}"
        log(f"  {config.method}: stopped — {entry['error']}")
        return entry
    entry["total_seconds"] = time.perf_counter() - t0
    for k, r in enumerate(result.requests):
        times = step_times.get(r.target, [])
        gaps = [b - a for a, b in zip(times, times[1:])]
        m = r.metrics
        entry["requests"].append({
            "index": k + 1, "target": r.target, **{key: m.get(key) for key in KEYS},
            "seconds": r.seconds, "steps": r.steps if times else 0, "seconds_per_step": _median(gaps),
            "peak_memory_mb": peaks[k][0] if k < len(peaks) else None,
            "peak_increase_mb": peaks[k][1] if k < len(peaks) else None,
            "eval_seconds": m.get("eval_seconds"), "measure_size": m.get("measure_size"),
            "final_losses": r.final_losses,
            "UA_per_concept": m.get("UA_per_concept"), "accuracy_per_concept": m.get("accuracy_per_concept"),
        })
    rows = entry["requests"]
    if rows:
        entry["final"] = {key: rows[-1][key] for key in KEYS}
        entry["seconds_per_request"] = [row["seconds"] for row in rows]
        entry["mean_seconds_per_request"] = sum(entry["seconds_per_request"]) / len(rows)
        entry["seconds_per_step"] = _median([row["seconds_per_step"] for row in rows if row["seconds_per_step"] is not None])
        entry["peak_memory_mb"] = max((row["peak_memory_mb"] for row in rows if row["peak_memory_mb"]), default=None)
        entry["peak_increase_mb"] = max((row["peak_increase_mb"] for row in rows
                                         if row["peak_increase_mb"] is not None), default=None)
    if after_last:
        after_last(result, entry)
    return entry


def _settings(profile: Profile):
    from duge.evaluation import EvaluationSettings, MeasureSize

    return EvaluationSettings(
        steps=profile.eval_steps, samples_per_prompt=profile.samples_per_prompt,
        retention_samples=profile.retention_samples, distance_samples=profile.distance_samples,
        compositional_samples=profile.compositional_samples, compositional_captions=profile.compositional_captions,
        seed=EVAL_SEED, final=MeasureSize(profile.final_samples_per_prompt, profile.final_retention_samples,
                                          profile.final_compositional_samples, profile.final_distance_samples))


def sequence_path(name: str) -> Path:
    """The concept set of a sequence: a method-tuning one (benchmarks/tuning/) or a shipped one."""
    from duge.concepts import example_concept_set_path

    return METHOD_TUNING_DIR / f"{name}.yaml" if name in METHOD_TUNING_SEQUENCES else example_concept_set_path(name)


def _load_sequence(name: str, profile: Profile):
    from duge.concepts import load_concept_set

    concept_set = load_concept_set(sequence_path(name))
    if profile.requests is not None:
        concept_set.requests = concept_set.requests[: profile.requests]
    return concept_set


def prepare(sequence: str, profile: Profile, model: str = "builtin", cache: Path | None = None, log=print):
    """(backend, concept set, evaluation with the unedited model measured, its JSON) for one sequence.

    The unedited model's measurement is read from `cache` when one with the same sequence, model and
    evaluation settings is there (the same numbers: same model, prompts and seeds), else measured
    and written there."""
    import torch
    from safetensors.torch import load_file, save_file

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import resolve_concept_set
    from duge.evaluation import RunEvaluation, world_measured_concepts
    from duge.models import load_pipeline
    from duge.paths import atomic_write
    from duge.world.callbacks import builtin_evaluator, uses_builtin_world

    concept_set = _load_sequence(sequence, profile)
    pipe = load_pipeline(model)
    if not uses_builtin_world(pipe):
        raise SystemExit(f"'{model}' is not a model of the built-in world; this benchmark measures with the built-in evaluator")
    backend = DiffusersBackend(pipe, dtype="float32")
    settings = _settings(profile)
    evaluation = RunEvaluation(backend, builtin_evaluator(), world_measured_concepts(), settings,
                               general_prompts=list(concept_set.general_prompts))
    requests = resolve_concept_set(concept_set, builtin_world=True)
    key = hashlib.sha256(json.dumps({"model": model, "sequence": sequence, "requests": [r.target for r in requests],
                                     "general": list(concept_set.general_prompts),
                                     # the sampler's batch size changes no image
                                     "evaluation": {k: v for k, v in asdict(settings).items() if k != "batch"},
                                     "version": 2}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"base_{sequence}_{key}" if cache else None
    if path is not None and (path.with_suffix(".json")).exists():
        base = json.loads(path.with_suffix(".json").read_text())
        features = load_file(str(path.with_suffix(".safetensors")))
        evaluation.measure_base_from(requests, base, {k == "final": v for k, v in features.items()})
        log(f"{sequence}: the unedited model's measurement read from {path.with_suffix('.json')}")
    else:
        log(f"{sequence}: measuring the unedited model on {len(requests)} requests ...")
        base = evaluation.measure_base(requests)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {("final" if final else "curve"): f.contiguous() for final, f in evaluation._base_features.items()
                       if f is not None}
            atomic_write(path.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)), overwrite=True)
            atomic_write_text(path.with_suffix(".json"), json.dumps(base, indent=1), overwrite=True)
    out = {"requests": [dict(entry, index=k + 1, target=requests[k].target) for k, entry in enumerate(base["after_request"])],
           "distance_floor": base.get("distance_floor"), "seconds": base["seconds"],
           "compositional_captions": base.get("compositional_captions"),
           "UA_per_concept": base["UA_per_concept"], "accuracy_per_concept": base["accuracy_per_concept"]}
    if base.get("final"):
        final = base["final"]
        out["final"] = {**final["after_request"][-1], "distance_floor": final.get("distance_floor"),
                        "UA_per_concept": final["UA_per_concept"], "accuracy_per_concept": final["accuracy_per_concept"]}
    del torch
    return backend, concept_set, evaluation, out


def run_benchmark(methods, seeds, profile: Profile = FULL, sequence: str = "sequence10", model: str = "builtin",
                  tuned: dict | None = None, cache: Path | None = None, log=print, checkpoint=None,
                  attack=None, deltas_dir: Path | None = None) -> dict:
    """One sequence, the given methods and training seeds (one after another), as a JSON-ready dict.

    attack: an AttackConfig — each run's model after its last request is attacked (run["attack"]), and the
    unedited model as the sanity row (result["attack"]). deltas_dir: each run's final edit is saved there."""
    import torch

    backend, concept_set, evaluation, base = prepare(sequence, profile, model, cache, log)
    memory = PeakMemory()
    out: dict = {
        "benchmark": "continual", "model": model, "sequence": sequence,
        "requests": [r.target for r in concept_set.requests], "setting": "sequential", "seeds": list(seeds),
        "profile": asdict(profile), "evaluation": asdict(evaluation.settings), "anchor_filter": None,
        "memory_measure": memory.method, "torch_threads": torch.get_num_threads(), "device": str(backend.device),
        "tuned": tuned, "git_commit": git_commit(), "base": base, "runs": {}, "complete": False,
    }
    attacks = None
    if attack is not None:
        attacks, out["attack"] = prepare_attacks(backend, concept_set.requests, attack, model, cache, log)
        if checkpoint:
            checkpoint(out)
    for method in methods:
        method_seeds = seeds
        if METHOD_TABLE[method].seed_independent and len(seeds) > 1:
            method_seeds = seeds[:1]
            log(f"{method}: a closed form draws nothing random; its run at seed {seeds[0]} stands for seeds "
                f"{', '.join(map(str, seeds))}")
        for seed in method_seeds:
            config = _unlearn_config(method, profile, seed, tuned)
            log(f"{method} seed {seed}: {len(concept_set.requests)} requests ...")
            runs = out["runs"].setdefault(method, {})

            def on_request(partial, runs=runs, seed=seed):
                runs[str(seed)] = partial
                if checkpoint:
                    checkpoint(out)

            def after_last(result, entry, config=config):
                if deltas_dir is not None:
                    entry["delta_file"] = save_final_delta(deltas_dir, result.total_delta, config, out).name
                if attacks is not None:
                    runs[str(config.seed)] = entry  # the training's numbers are kept while the attacks run
                    if checkpoint:
                        checkpoint(out)
                    entry["attack"] = attack_run(attacks, config.method, config.seed, result.total_delta, log)

            runs[str(seed)] = run_method(config, backend, concept_set, evaluation, memory,
                                         profile.measure_every_request, log=log, on_request=on_request,
                                         after_last=after_last)
            if checkpoint:
                checkpoint(out)
    memory.close()
    out["complete"] = True
    return out


def attack_config(attack: str, quick: bool = False, budget: int | None = None):
    """The benchmark's AttackConfig: duge/config.py's defaults (QUICK_ATTACK's sizes with --quick), `budget` if given."""
    from duge.config import AttackConfig

    config = AttackConfig(attack=attack, **(QUICK_ATTACK if quick else {}))
    if budget is not None:
        config.budget = budget
    config.validate()
    return config


def prepare_attacks(backend, requests, config, model: str, cache: Path | None = None, log=print):
    """(SharedAttacks for the requests' erased concepts, result["attack"]: the config, the concepts and the
    sanity row — the unedited model attacked the same way, read from `cache` when it was measured before)."""
    from duge.attacks import erased_concepts
    from duge.concepts import resolve_request
    from duge.world.callbacks import builtin_evaluator

    evaluator = builtin_evaluator()
    concepts = erased_concepts([resolve_request(r, builtin_world=True) for r in requests], evaluator, True)
    section = {"config": asdict(config), "concepts": [c.name for c in concepts], "sanity_share": SANITY_SHARE}
    key = hashlib.sha256(json.dumps({"model": model, "concepts": section["concepts"], "config": section["config"],
                                     "version": 1}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"attack_unedited_{key}.json" if cache else None
    log(f"attacks: {', '.join(section['concepts'])}: drawing the unedited model's images for the objectives ...")
    attacks = SharedAttacks(backend, evaluator, concepts, config)
    if path is not None and path.exists():
        unedited = json.loads(path.read_text())
        log(f"attacks: the unedited model's sanity row read from {path}")
    else:
        log("attacks: the unedited model (sanity row) ...")
        unedited = attacks.sanity()
        if path is not None:
            atomic_write_text(path, json.dumps(unedited, indent=1), overwrite=True)
    section["unedited"] = unedited
    section["sanity"] = unedited["sanity"]
    log(f"attacks: sanity — images showing the concept: "
        + ", ".join(f"{k} {v:.3f}" for k, v in section["sanity"]["shown"].items())
        + f" (needs >= {SANITY_SHARE}: {'met' if section['sanity']['met'] else 'NOT met'})")
    return attacks, section


def attack_run(attacks: SharedAttacks, method: str, seed: int, total_delta: dict, log=print) -> dict:
    """The attacks on one run's model after its last request (`SharedAttacks.after_last_request`), or the error."""
    from duge.errors import DugeError

    log(f"  {method} seed {seed}: attacking {len(attacks.concepts)} erased concept(s) ...")
    try:
        row = attacks.after_last_request(method, total_delta)
    except DugeError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    log(f"  {method} seed {seed}: " + " ".join(f"{k} {_fmt(row.get(k))}" for k in ATTACK_KEYS))
    return {**row, "git_commit": git_commit()}  # an attached attack's code can differ from the training run's


def _delta_identity(result: dict, method: str, seed: int) -> dict:
    return {"benchmark": "continual", "model": result["model"], "sequence": result["sequence"],
            "requests": json.dumps(result["requests"]), "method": method, "seed": str(seed)}


def save_final_delta(folder: Path, total_delta: dict, config, result: dict) -> Path:
    """Write one run's final edit (θ − θ0 per edited layer) as FOLDER/METHOD_seedSEED.safetensors, with the run's
    identity (model, sequence, requests, method, seed), config and code in its metadata; refuses to overwrite."""
    from safetensors.torch import save_file

    from duge.paths import atomic_write

    metadata = {**_delta_identity(result, config.method, config.seed), "config": json.dumps(asdict(config)),
                "git_commit": str(git_commit())}
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in total_delta.items()}
    path = Path(folder) / f"{config.method}_seed{config.seed}.safetensors"
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_final_delta(path: Path, backend, result: dict, method: str, seed: int) -> dict:
    """A run's final edit saved by `save_final_delta`, checked (safetensors only, finite, the run it claims
    to be, layers and shapes of `backend`'s UNet); raises ModelLoadError otherwise."""
    import torch

    from duge.errors import ModelLoadError
    from duge.io import read_safetensors_metadata
    from duge.safe_weights import check_fits, load_tensors

    tensors = load_tensors(path)
    metadata = read_safetensors_metadata(path)
    expected = _delta_identity(result, method, seed)
    wrong = [k for k, v in expected.items() if metadata.get(k) != v]
    if wrong:
        raise ModelLoadError(f"'{path}' is not the final edit of {method} seed {seed} of this result: its "
                             + ", ".join(f"{k} {metadata.get(k)!r} (expected {expected[k]!r})" for k in wrong))
    weights = {f"{name}.weight": module.weight for name, module in backend.unet.named_modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor)}
    unknown = [name for name in tensors if f"{name}.weight" not in weights]
    if unknown:
        raise ModelLoadError(f"'{path}': layer '{unknown[0]}' is not a layer of the model's UNet")
    check_fits({f"{k}.weight": v for k, v in tensors.items()}, weights, path, "saved edit")
    return tensors


def attach_attacks(result: dict, deltas_dir: Path, attack, cache: Path | None = None, log=print,
                   checkpoint=None) -> dict:
    """`result` (a continual.json) with every run whose final edit was saved in `deltas_dir` attacked as a
    run with --attack would have been (run["attack"]), and the sanity row (result["attack"]). Runs that
    already hold attacks with another config, or whose edit was not saved, are named and left as they are."""
    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import load_concept_set
    from duge.models import load_pipeline

    earlier = result.get("attack")
    if earlier and earlier.get("config") != asdict(attack):
        raise SystemExit("--attach: the result already holds attacks with other settings; attach with the same "
                         "--attack and --attack-budget, or to a result made without --attack")
    requests = load_concept_set(sequence_path(result["sequence"])).requests[: len(result["requests"])]
    if [r.target for r in requests] != result["requests"]:
        raise SystemExit(f"--attach: the result's requests {result['requests']} are not the start of "
                         f"{result['sequence']}'s")
    backend = DiffusersBackend(load_pipeline(result["model"]), dtype="float32")
    attacks, result["attack"] = prepare_attacks(backend, requests, attack, result["model"], cache, log)
    for method, runs in result.get("runs", {}).items():
        for seed, entry in runs.items():
            path = Path(deltas_dir) / f"{method}_seed{seed}.safetensors"
            if "attack" in entry or not entry.get("final"):
                continue
            if not path.exists():
                log(f"  {method} seed {seed}: no saved edit ({path}); not attacked")
                continue
            delta = load_final_delta(path, backend, result, method, int(seed))
            entry["attack"] = attack_run(attacks, method, int(seed), delta, log)
            if checkpoint:
                checkpoint(result)
    return result


def run_tuning(methods, profile: Profile = TUNING, seed: int = 0, model: str = "builtin", cache: Path | None = None,
               log=print, checkpoint=None, done: dict | None = None) -> dict:
    """The tuning protocol (module doc) on the tuning sequence: every method's four runs and its choice.

    done: an earlier tuning.json's "runs" (--resume); a run whose method and settings it already holds
    with a final H is taken from there (it keeps its own git_commit) instead of being trained again."""
    backend, concept_set, evaluation, base = prepare(TUNING_SEQUENCE, profile, model, cache, log)
    memory = PeakMemory()
    out: dict = {"benchmark": "tuning", "model": model, "sequence": TUNING_SEQUENCE,
                 "requests": [r.target for r in concept_set.requests], "seed": seed, "profile": asdict(profile),
                 "evaluation": asdict(evaluation.settings), "lr_factors": list(LR_FACTORS), "uce_grid": list(UCE_GRID),
                 "git_commit": git_commit(), "base": base, "runs": {}, "complete": False}

    def run(method, settings):
        earlier = [e for e in (done or {}).get(method, [])
                   if e.get("settings") == settings and (e.get("final") or {}).get("H") is not None]
        if earlier:
            log(f"{method} {settings}: taken from --resume (code {earlier[0].get('git_commit')})")
            out["runs"].setdefault(method, []).append(earlier[0])
            return earlier[0]["final"]["H"]
        config = _unlearn_config(method, profile, seed, {method: settings})
        log(f"{method} {settings} ...")
        entry = run_method(config, backend, concept_set, evaluation, memory, measure_every_request=False, log=log)
        out["runs"].setdefault(method, []).append({"settings": settings, **entry})
        if checkpoint:
            checkpoint(out)
        return (entry.get("final") or {}).get("H")

    for method in methods:
        spec = METHOD_TABLE[method]
        if spec.objective == "closed_form":
            for settings in UCE_GRID:
                run(method, dict(settings))
            continue
        start_lr, start_steps = spec.tuning_start["learning_rate"], spec.tuning_start["steps"]
        if profile.steps is not None:  # a profile that fixes the steps (tests) scales the grid's steps too
            start_steps = profile.steps
        scores = {}
        for factor in LR_FACTORS:
            lr = start_lr * factor
            scores[lr] = run(method, {"learning_rate": lr, "steps": start_steps})
        best_lr = max(scores, key=lambda lr: -1.0 if scores[lr] is None else scores[lr])
        run(method, {"learning_rate": best_lr, "steps": max(1, start_steps // 2)})
    out["chosen"] = choose(out["runs"])
    out["complete"] = True
    return out


def choose(runs: dict) -> dict:
    """Per method, the run with the highest final H on the tuning sequence (ties: the cheaper one)."""
    chosen = {}
    for method, entries in runs.items():
        scored = [e for e in entries if (e.get("final") or {}).get("H") is not None]
        if not scored:
            chosen[method] = {"settings": None, "why": "every run failed: " + "; ".join(e.get("error", "?") for e in entries)}
            continue
        best = max(scored, key=lambda e: (e["final"]["H"], -(e.get("total_seconds") or 0.0)))
        chosen[method] = {"settings": best["settings"], "H": best["final"]["H"],
                          **{k: best["final"].get(k) for k in ("UA", "IRA", "CRA")},
                          "why": f"highest final H of {len(entries)} of the protocol's {GRID_RUNS} runs on the tuning sequence ("
                                 + ", ".join(f"{_settings_text(e['settings'])}: H {_fmt((e.get('final') or {}).get('H'))}"
                                             + (" (failed)" if "error" in e else "") for e in entries) + ")"}
    return chosen


def _settings_text(settings: dict) -> str:
    names = {"learning_rate": "lr", "steps": "steps", "uce_lambda": "λ", "uce_preserve_scale": "s_p"}
    return " ".join(f"{names.get(k, k)} {v:g}" if isinstance(v, float) else f"{names.get(k, k)} {v}"
                    for k, v in settings.items())


# ---------------------------------------------------------------- combining seeds and parts


def mean_h_over_requests(run: dict) -> float | None:
    """The mean of H after each request of one run (None if a request has no H): how well a method did over the
    whole sequence, not only at its end."""
    values = [r.get("H") for r in run.get("requests") or []]
    return None if not values or None in values else sum(values) / len(values)


def _paired_seeds(name: str, by_seed: dict, seeds) -> dict:
    """{seed: value} of method `name` for pairing with DUGE's `seeds`: a seed-independent method's (duge.methods:
    a closed form) one run stands for every seed."""
    method = METHOD_TABLE.get(name)
    if len(by_seed) == 1 and method is not None and method.seed_independent:
        (value,) = by_seed.values()
        return {s: value for s in seeds}
    return by_seed


def summarize(result: dict) -> dict:
    """result["methods"]: per method the mean over seeds of every request's numbers, the final numbers'
    mean ± 95 % CI, the cost and its ratio to ESD-x's; result["significance"]: each baseline's final H
    (and UA, IRA, CRA) minus DUGE's, paired over seeds."""
    methods = {}
    for name, runs in result.get("runs", {}).items():
        done = {s: e for s, e in runs.items() if e.get("requests") and "error" not in e and not e.get("unfinished")}
        entry: dict = {"seeds": sorted(done, key=int), "errors": {s: e["error"] for s, e in runs.items() if "error" in e},
                       "unfinished": sorted((s for s, e in runs.items() if e.get("unfinished")), key=int)}
        if done:
            n_req = min(len(e["requests"]) for e in done.values())
            entry["requests"] = []
            for k in range(n_req):
                row = {"index": k + 1, "target": next(iter(done.values()))["requests"][k]["target"]}
                for key in KEYS + ("seconds", "seconds_per_step"):
                    row[key], row[f"{key}_ci95"], _ = mean_ci([e["requests"][k].get(key) for e in done.values()])
                entry["requests"].append(row)
            entry["final"], entry["final_ci95"] = {}, {}
            for key in KEYS:
                entry["final"][key], entry["final_ci95"][key], _ = mean_ci([e["final"].get(key) for e in done.values()])
            entry["per_seed_final"] = {s: e["final"] for s, e in done.items()}
            per_seed_mean_h = {s: mean_h_over_requests(e) for s, e in done.items()}
            entry["mean_H_over_requests"], entry["mean_H_over_requests_ci95"], _ = mean_ci(per_seed_mean_h.values())
            for key in ("mean_seconds_per_request", "seconds_per_step", "peak_memory_mb", "peak_increase_mb"):
                entry[key], entry[f"{key}_ci95"], _ = mean_ci([e.get(key) for e in done.values()])
            entry["total_seconds_per_seed"] = {s: e.get("total_seconds") for s, e in done.items()}
            entry["git_commits"] = sorted({e.get("git_commit") or "?" for e in done.values()})
            entry["config"] = next(iter(done.values())).get("config")
            attacked = {s: e["attack"] for s, e in done.items() if e.get("attack") and "error" not in e["attack"]}
            if attacked:  # --attack: the post-attack numbers after the last request, over the seeds attacked
                entry["attack"] = {"seeds": sorted(attacked, key=int),
                                   "per_seed_post_attack_UA": {s: a.get("post_attack_UA") for s, a in attacked.items()}}
                for key in ATTACK_KEYS + ("seconds",):
                    entry["attack"][key], entry["attack"][f"{key}_ci95"], _ = mean_ci([a.get(key) for a in attacked.values()])
            attack_errors = {s: e["attack"]["error"] for s, e in done.items() if "error" in (e.get("attack") or {})}
            if attack_errors:
                entry["attack_errors"] = attack_errors
        methods[name] = entry
    reference = methods.get("esd-x", {})
    for entry in methods.values():
        for key in ("mean_seconds_per_request", "seconds_per_step"):
            if entry.get(key) is not None and reference.get(key):
                entry[f"{key}_vs_esd_x"] = entry[key] / reference[key]
    result["methods"] = methods
    significance = {}
    duge_runs = {s: e["final"] for s, e in result.get("runs", {}).get("duge", {}).items() if e.get("final")}
    for name, runs in result.get("runs", {}).items():
        if name == "duge" or not duge_runs:
            continue
        finals = _paired_seeds(name, {s: e["final"] for s, e in runs.items() if e.get("final")}, duge_runs)
        significance[name] = {key: paired_difference({s: f.get(key) for s, f in finals.items()},
                                                     {s: f.get(key) for s, f in duge_runs.items()})
                              for key in ("H", "UA", "IRA", "CRA", "compositional", "distance")}
        significance[name]["mean_H_over_requests"] = paired_difference(
            _paired_seeds(name, {s: mean_h_over_requests(e) for s, e in runs.items() if e.get("final")}, duge_runs),
            {s: mean_h_over_requests(e) for s, e in result["runs"]["duge"].items() if e.get("final")})
        post_attack = {n: {s: e["attack"].get("post_attack_UA") for s, e in r.items() if e.get("final")
                           and "post_attack_UA" in (e.get("attack") or {})}
                       for n, r in (("method", runs), ("duge", result["runs"]["duge"]))}
        post_attack["method"] = _paired_seeds(name, post_attack["method"], post_attack["duge"])
        if post_attack["method"] and post_attack["duge"]:
            significance[name]["post_attack_UA"] = paired_difference(post_attack["method"], post_attack["duge"])
    result["significance_vs_duge"] = significance
    return result


def _commits(result: dict) -> list[str]:
    """A result's git commit(s): one string, or a list once it is itself a merge of parts."""
    commit = result.get("git_commit") or "?"
    return list(commit) if isinstance(commit, list) else [commit]


def merge_results(results: list[dict]) -> dict:
    """One result from parts run with the same sequence, model, profile and evaluation (methods or seeds
    split over processes). The unedited model's numbers are the first part's (the same images);
    seconds_total is the longest part's. Raises SystemExit naming the first setting that differs."""
    same = ("benchmark", "model", "sequence", "requests", "setting", "profile", "evaluation")
    def comparable(result: dict, key: str):
        value = result.get(key)
        if key == "evaluation" and value:  # how many images one sampler call takes changes no image
            return {k: v for k, v in value.items() if k != "batch"}
        if key == "profile" and value:  # a size left unset (None: the method's own) under any name
            return {k: v for k, v in value.items() if v is not None}
        return value

    first = results[0]
    for other in results[1:]:
        for key in same:
            if comparable(other, key) != comparable(first, key):
                raise SystemExit(f"--merge: the parts differ in {key!r}; only parts with the same settings combine")
    merged = dict(first, merged_from=len(results), git_commit=sorted({c for r in results for c in _commits(r)}))
    attacks = [r["attack"] for r in results if r.get("attack")]  # parts run without --attack hold none
    for other in attacks[1:]:
        for key in ("config", "concepts"):
            if other.get(key) != attacks[0].get(key):
                raise SystemExit(f"--merge: the parts' attacks differ in {key!r}; only attacks with the same "
                                 "settings combine")
    if attacks:
        merged["attack"] = attacks[0]
    if first.get("benchmark") == "tuning":
        merged["runs"] = {}
        for result in results:
            merged["runs"].update(result.get("runs") or {})
        merged["chosen"] = choose(merged["runs"])
    else:
        merged["runs"] = {}
        for result in results:
            for method, runs in (result.get("runs") or {}).items():
                merged["runs"].setdefault(method, {}).update(runs)
        merged["seeds"] = sorted({int(s) for runs in merged["runs"].values() for s in runs})
        summarize(merged)
    merged["complete"] = all(r.get("complete") for r in results)
    merged["seconds_total"] = max(r.get("seconds_total") or 0.0 for r in results)
    return merged


# ---------------------------------------------------------------- output


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pm(mean, half, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def format_table(result: dict) -> str:
    """Markdown: final numbers per method (mean ± 95 % CI over seeds), cost ratios, significance, erosion."""
    if result.get("benchmark") == "tuning":
        lines = [f"tuning sequence ({', '.join(result['requests'])}), training seed {result.get('seed', 0)}; "
                 "final numbers after the last request", "",
                 "| method | settings | UA | IRA | CRA | H | compositional | median s/request | s/step | code |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for method, entries in result.get("runs", {}).items():
            for e in entries:
                f = e.get("final") or {}
                lines.append(f"| {method} | {_settings_text(e['settings'])} | "
                             + (f"failed: {e['error']} |||||||" if "error" in e else
                                " | ".join(_fmt(f.get(k)) for k in ("UA", "IRA", "CRA", "H", "compositional"))
                                + f" | {_fmt(_median(e.get('seconds_per_request') or []), 0)} | {_fmt(e.get('seconds_per_step'), 2)}"
                                + f" | {(e.get('git_commit') or '?')[:7]} |"))
        lines += ["", "| method | chosen | final H | why |", "|---|---|---|---|"]
        for method, c in result.get("chosen", {}).items():
            lines.append(f"| {method} | {_settings_text(c['settings']) if c.get('settings') else '—'} | "
                         f"{_fmt(c.get('H'))} | {c['why']} |")
        return "\n".join(lines)
    lines = [f"{result['sequence']}: {len(result['requests'])} requests ({', '.join(result['requests'])}); "
             f"mean ± 95 % CI over training seeds (n per row; '1 (any seed)': a closed form, the same edit at every "
             f"training seed, run once and paired with each of DUGE's seeds); KID ×1000", "",
             "| method | n | UA | IRA | CRA | H | compositional | KID×1000 | H̄ over requests | s/request ÷ ESD-x "
             "| s/step ÷ ESD-x |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = result["base"].get("final") or (result["base"]["requests"][-1] if result["base"]["requests"] else {})
    floor = base.get("distance_floor", result["base"].get("distance_floor"))
    lines.append(f"| unedited | — | {_fmt(base.get('UA'))} | {_fmt(base.get('IRA'))} | {_fmt(base.get('CRA'))} | "
                 f"{_fmt(base.get('H'))} | {_fmt(base.get('compositional'))} | "
                 f"{_fmt(None if floor is None else floor * 1000, 2)} (floor) | | | |")
    for name, entry in result["methods"].items():
        if not entry.get("final"):
            lines.append(f"| {name} | 0 | not run or failed: {entry.get('errors') or entry.get('unfinished')} ||||||||||")
            continue
        f, ci = entry["final"], entry["final_ci95"]
        kid = None if f.get("distance") is None else f["distance"] * 1000
        kid_ci = None if ci.get("distance") is None else ci["distance"] * 1000
        n = len(entry["seeds"])
        fixed = n == 1 and name in METHOD_TABLE and METHOD_TABLE[name].seed_independent
        lines.append(f"| {name} | {'1 (any seed)' if fixed else n} | " + " | ".join(_pm(f.get(k), ci.get(k)) for k in
                                                                            ("UA", "IRA", "CRA", "H", "compositional"))
                     + f" | {_pm(kid, kid_ci, 2)} | {_pm(entry.get('mean_H_over_requests'), entry.get('mean_H_over_requests_ci95'))}"
                     f" | {_fmt(entry.get('mean_seconds_per_request_vs_esd_x'), 2)} | "
                     f"{_fmt(entry.get('seconds_per_step_vs_esd_x'), 2)} |")
    sig = result.get("significance_vs_duge") or {}
    if sig:
        lines += ["", "each baseline minus DUGE, paired over seeds (mean ± 95 % CI; * = the CI excludes 0; KID×1000):",
                  "", "| method | final H | final UA | final IRA | final compositional | final KID×1000 | H̄ over requests |",
                  "|---|---|---|---|---|---|---|"]
        for name, diffs in sig.items():
            lines.append(f"| {name} | " + " | ".join(
                _difference_text(diffs.get(key), 1000 if key == "distance" else 1)
                for key in ("H", "UA", "IRA", "compositional", "distance", "mean_H_over_requests")) + " |")
    if result.get("attack"):
        lines += ["", *format_attacks(result)]
    lines += ["", "after each request, mean over seeds: UA / IRA / CRA / compositional", ""]
    lines.append("| method | " + " | ".join(f"{k + 1}:{t}" for k, t in enumerate(result["requests"])) + " |")
    lines.append("|---|" + "---|" * len(result["requests"]))
    for name, entry in result["methods"].items():
        cells = [f"{_fmt(r.get('UA'), 2)}/{_fmt(r.get('IRA'), 2)}/{_fmt(r.get('CRA'), 2)}/{_fmt(r.get('compositional'), 2)}"
                 for r in entry.get("requests", [])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference_text(d: dict | None, scale: float = 1) -> str:
    if d is None:
        return "—"
    digits = 1 if scale != 1 else 3
    return (f"{d['mean'] * scale:+.{digits}f}" + ("" if d["ci95"] is None else f" ± {d['ci95'] * scale:.{digits}f}")
            + (" *" if d["significant"] else "") + f" (n {d['n']})")


def format_attacks(result: dict) -> list[str]:
    """Markdown lines: the post-attack UA per method after the last request, the sanity row first."""
    section = result["attack"]
    config = section["config"]
    lines = [f"post-attack UA after the last request: {config['attack']} attack(s) on each erased concept "
             f"({', '.join(section['concepts'])}), {config['budget']} UNet passes per attack and concept, "
             f"{config['eval_images']} held-out images each; UA = share NOT showing the concept, mean over concepts, "
             "then mean ± 95 % CI over seeds; post-attack = per concept the lowest of the plain prompt's and each attack's",
             "", "| method | n | UA plain prompt | UA prompt search | UA inversion | post-attack UA | attack s |",
             "|---|---|---|---|---|---|---|"]
    unedited = section.get("unedited") or {}
    lines.append("| unedited (sanity) | — | " + " | ".join(_fmt(unedited.get(k)) for k in ATTACK_KEYS)
                 + f" | {_fmt(unedited.get('seconds'), 0)} |")
    for name, entry in result.get("methods", {}).items():
        a = entry.get("attack")
        if not a:
            errors = entry.get("attack_errors")
            lines.append(f"| {name} | 0 | " + (f"failed: {errors} |||||" if errors else "not attacked |||||"))
            continue
        lines.append(f"| {name} | {len(a['seeds'])} | " + " | ".join(_pm(a.get(k), a.get(f"{k}_ci95")) for k in ATTACK_KEYS)
                     + f" | {_fmt(a.get('seconds'), 0)} |")
    sanity = section.get("sanity") or {}
    lines += ["", "sanity: the attacks' images of the never-edited model that show the concept: "
              + ", ".join(f"{k} {v:.3f}" for k, v in (sanity.get("shown") or {}).items())
              + f" (needs >= {section.get('sanity_share', SANITY_SHARE)}: {'met' if sanity.get('met') else 'NOT met'})"]
    sig = {n: d["post_attack_UA"] for n, d in (result.get("significance_vs_duge") or {}).items() if d.get("post_attack_UA")}
    if sig:
        lines.append("post-attack UA of each baseline minus DUGE's, paired over seeds: " + "; ".join(
            f"{n} {d['mean']:+.3f}" + ("" if d["ci95"] is None else f" ± {d['ci95']:.3f}")
            + (" *" if d["significant"] else "") + f" (n {d['n']})" for n, d in sig.items()))
    return lines


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """erosion.png (UA, IRA, CRA, compositional, KID vs request: mean over seeds, 95 % CI band) and
    cost.png (seconds per request)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = {name: e for name, e in result.get("methods", {}).items() if e.get("requests")}
    if not methods:  # a checkpoint before any request was measured: nothing to draw yet
        return []
    base = result["base"]["requests"]
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    titles = {"UA": "UA (erased stays erased)", "IRA": "IRA (same kind kept)", "CRA": "CRA (other kinds kept)",
              "compositional": "compositional (all three right)", "distance": "KID to the unedited model"}
    for ax, key in zip(axes, titles):
        for name, entry in methods.items():
            rows = [r for r in entry["requests"] if r.get(key) is not None]
            xs, ys = [r["index"] for r in rows], [r[key] for r in rows]
            line, = ax.plot(xs, ys, marker="o", label=f"{name} (n {len(entry['seeds'])})")
            lo = [y - (r.get(f"{key}_ci95") or 0) for y, r in zip(ys, rows)]
            hi = [y + (r.get(f"{key}_ci95") or 0) for y, r in zip(ys, rows)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        if key != "distance":
            ax.plot([b["index"] for b in base], [b.get(key) for b in base], "k--", label="unedited")
            ax.set_ylim(-0.02, 1.02)
        elif result["base"].get("distance_floor") is not None:
            ax.axhline(result["base"]["distance_floor"], color="k", linestyle="--", label="unedited (other seeds)")
        ax.set_title(titles[key])
        ax.set_xlabel("request")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['sequence']}: {len(result['requests'])} sequential requests on the built-in world "
                 "(mean over training seeds, 95 % CI band)")
    fig.tight_layout()
    paths = [out_dir / "erosion.png"]
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in methods.items():
        ax.plot([r["index"] for r in entry["requests"]], [r.get("seconds") or float("nan") for r in entry["requests"]],
                marker="o", label=name)
    ax.set_title("seconds per request (caching + training; shared machine)")
    ax.set_xlabel("request")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "cost.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 requests, few steps and samples (CI)")
    parser.add_argument("--tune", action="store_true", help="run the tuning protocol on the tuning sequence")
    parser.add_argument("--sequence", default="sequence10",
                        choices=[*REPORTED_SEQUENCES, TUNING_SEQUENCE, *METHOD_TUNING_SEQUENCES],
                        help="a reported sequence, or one for tuning (benchmarks/tuning/: measured only after the "
                             "last request, at the tuning protocol's sizes)")
    parser.add_argument("--json", default=None, help="where the JSON goes (default: OUT/continual.json or OUT/tuning.json)")
    parser.add_argument("--out", default="benchmark-results/continual", help="folder for the JSON, table and plots")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (reported runs: 0,1,2)")
    parser.add_argument("--tuned", default=None, help="a tuning.json whose chosen settings the methods run with")
    parser.add_argument("--requests", type=int, default=None, help="only the first N requests")
    parser.add_argument("--steps", type=int, default=None, help="training steps per request (all methods)")
    parser.add_argument("--eval-steps", type=int, default=None, help="sampler steps of the measurement images")
    parser.add_argument("--cache", default=None, help="folder for the unedited model's measurement (default: OUT/..)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="instead of running: combine parts run with the same settings into one JSON, table and plots")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: cost measured per core)")
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD:]FIELD=VALUE",
                        help="override an UnlearnConfig field for every method or one (repeatable)")
    parser.add_argument("--resume", default=None, metavar="JSON",
                        help="with --tune: an earlier tuning.json whose finished runs are kept, not trained again")
    parser.add_argument("--attack", choices=("prompt", "inversion", "both"), default=None,
                        help="after each run's last request, attack its model (and the unedited one, the sanity row) "
                             "with duge/config.py's AttackConfig; off by default")
    parser.add_argument("--attack-budget", type=int, default=None,
                        help="UNet passes per attack and concept (default: AttackConfig's; the same for every method)")
    parser.add_argument("--save-deltas", action="store_true",
                        help="keep each run's final edit in OUT/deltas (safetensors) so --attach can attack it later")
    parser.add_argument("--attach", default=None, metavar="JSON",
                        help="instead of running: attack the saved final edits of this continual.json's runs "
                             "(with --attack) and write it with the attacks attached")
    parser.add_argument("--deltas", default=None, help="with --attach: the folder of saved edits (default: JSON's "
                                                        "folder/deltas)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.attach and not args.attack:
        parser.error("--attach needs --attack prompt|inversion|both")
    if args.attack and args.tune:
        parser.error("--attack is for reported runs, not the tuning protocol")

    import torch

    torch.set_num_threads(max(1, args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; expected a subset of {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    tuning_sizes = args.tune or args.sequence in METHOD_TUNING_SEQUENCES
    profile = Profile(**asdict(QUICK if args.quick else TUNING if tuning_sizes else FULL))
    if args.requests is not None:
        profile.requests = args.requests
    if args.steps is not None:
        profile.steps = args.steps
    if args.eval_steps is not None:
        profile.eval_steps = args.eval_steps
    profile.config_overrides.update(parse_overrides(args.set))
    tuned = None
    if args.tuned:
        chosen = json.loads(Path(args.tuned).read_text()).get("chosen") or {}
        tuned = {m: c["settings"] for m, c in chosen.items() if c.get("settings")}

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tuning = args.tune or (args.merge and json.loads(Path(args.merge[0]).read_text()).get("benchmark") == "tuning")
    json_path = Path(args.json) if args.json else out_dir / ("tuning.json" if tuning else "continual.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out_dir.parent / "base_cache"
    t0 = time.perf_counter()

    def save(result: dict) -> None:
        result["seconds_total"] = time.perf_counter() - t0
        if result.get("benchmark") == "continual":
            summarize(result)
            if not args.no_plots and result.get("methods"):
                result["plots"] = [str(p) for p in write_plots(result, out_dir)]
        atomic_write_text(json_path, json.dumps(result, indent=1), overwrite=True)
        atomic_write_text(json_path.with_name(json_path.stem + "_table.md"), format_table(result) + "\n", overwrite=True)

    attack = attack_config(args.attack, args.quick, args.attack_budget) if args.attack else None
    if args.merge:
        result = merge_results([json.loads(Path(p).read_text()) for p in args.merge])
        t0 -= result["seconds_total"]
    elif args.attach:
        result = json.loads(Path(args.attach).read_text())
        if result.get("benchmark") != "continual":
            parser.error(f"--attach: {args.attach} is not a continual.json")
        if json_path.resolve() == Path(args.attach).resolve():
            parser.error("--attach: the output would overwrite the input JSON; give another --out or --json")
        t0 -= result.get("seconds_total") or 0.0
        deltas = Path(args.deltas) if args.deltas else Path(args.attach).parent / "deltas"
        result = attach_attacks(result, deltas, attack, cache, checkpoint=save)
    elif args.tune:
        done = json.loads(Path(args.resume).read_text()).get("runs") if args.resume else None
        result = run_tuning(methods, profile, seed=seeds[0], model=args.model, cache=cache, checkpoint=save, done=done)
    else:
        result = run_benchmark(methods, seeds, profile, sequence=args.sequence, model=args.model, tuned=tuned,
                               cache=cache, checkpoint=save, attack=attack,
                               deltas_dir=out_dir / "deltas" if args.save_deltas else None)
    save(result)
    print(format_table(result))
    print(f"\nwrote {json_path} in {result['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

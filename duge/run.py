"""A whole unlearning job as the command line runs it: load, measure, unlearn, save, report.

`run_unlearn` writes into a temporary folder beside the output folder and renames it into place
at the end, so an interrupted run leaves no half-written output folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .attacks import attack_concepts, erased_concepts
from .backends.diffusers_backend import DiffusersBackend, storage_dtype
from .concepts import ResolvedRequest, load_concept_set, render_prompt, resolve_concept_set
from .config import EVALUATION_SEED_OFFSET
from .distributed import launched_distributed
from .distributed import start as start_distributed
from .errors import DugeError, OutputExistsError
from .evaluation import concepts_for, retention_ratios, shown_prompts
from .grids import labelled_grid, to_pil
from .image_cache import BUILTIN_SAMPLE_BATCH_SIZE, SAMPLE_BATCH_SIZE, sample_with_progress
from .io import make_manifest, model_hash, read_manifest, save_diffusers_folder, save_lora, save_single_file
from .model_metadata import base_model_of_pipeline
from .models import load_pipeline, resolve_model_path
from .paths import temporary_folder
from .phases import Phases, current_phases
from .progress import PROGRESS_FOLDER, ProgressCheckpoint, progress_folder, require_progress, run_inputs
from .report import write_report
from .results import erased_in_manifest, manifest_rows
from .trainer import unlearn
from .measuring import measuring, measuring_mode
from .world.callbacks import anchor_filter, builtin_evaluator, uses_builtin_world

GRID_IMAGES = 4  # images per prompt, before and after, in before_after.png
GRID_STEPS = 25  # sampler steps of those images when they are sampled (a run that does not measure before and after)


def comparison_prompts(requests: list[ResolvedRequest]) -> list[str]:
    """For before/after grids: each target's first template, and each preserved concept's."""
    prompts = []
    for r in requests:
        prompts.append(render_prompt(r.templates[0], r.target))
        prompts += [render_prompt(r.templates[0], p) for p in r.preserve[:2]]
    return list(dict.fromkeys(prompts))


def before_after_grid(before_generate, after_generate, prompts, n: int, seed: int):
    """A grid of each prompt's `n` images before and after (image i from seed `seed + i`, the same for both).

    `before_generate(prompts, seeds)` / `after_generate(prompts, seeds)` -> images [N, 3, H, W]: all
    prompts' images are asked for at once, one seed per image."""
    every_prompt = [prompt for prompt in prompts for _ in range(n)]
    seeds = [seed + i for _ in prompts for i in range(n)]
    before, after = before_generate(every_prompt, seeds), after_generate(every_prompt, seeds)
    return _before_after_rows({p: before[k * n : (k + 1) * n] for k, p in enumerate(prompts)},
                              {p: after[k * n : (k + 1) * n] for k, p in enumerate(prompts)}, list(prompts))


def _before_after_rows(before: dict, after: dict, prompts: list[str]):
    """A labelled grid: a row per prompt, its images [n, 3, H, W] before, then after."""
    rows = [[to_pil(x) for x in before[p]] + [to_pil(x) for x in after[p]] for p in prompts]
    n = min(len(before[p]) for p in prompts)
    columns = [f"before {i}" for i in range(n)] + [f"after {i}" for i in range(n)]
    return labelled_grid(rows, prompts, column_labels=columns)


def measured_grid(before: dict, after: dict, target_prompts: list[str], preserved_prompts: list[str]):
    """The before/after grid from a run's first and last measurements' own images (`Measuring.shown`: prompt ->
    images [n, 3, H, W], image i of the measurement's seeds, the same in both): a row per target prompt and per
    preserved concept's prompt that both measured. None when a target's images are missing from either (e.g. a
    resumed run, whose first measurement's images were not kept), and the grid is sampled instead."""
    if not target_prompts or any(p not in before or p not in after for p in target_prompts):
        return None
    return _before_after_rows(before, after, target_prompts + [p for p in preserved_prompts if p in before and p in after])


def prepare_output_folder(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """A fresh temporary folder beside `out`; refuses an existing non-empty `out` without overwrite.

    `out/progress/` (the checkpoints of an interrupted run, `duge.progress`) is what `resume`
    continues from; anything else in `out` still needs `overwrite`.
    """
    out = Path(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a folder; expected a folder for the outputs")
    if entries and not overwrite:
        others = [name for name in entries if name != PROGRESS_FOLDER]
        if not resume and not others:
            raise OutputExistsError(f"output folder '{out}' holds the progress of an interrupted run; pass --resume "
                                    "to continue it, or --overwrite to start again")
        if others:
            raise OutputExistsError(f"output folder '{out}' exists and is not empty ({', '.join(others[:5])}); "
                                    "pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return temporary_folder(out)


def publish_output_folder(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder to `out` (replacing an old one only now, at the end)."""
    if out.exists():
        backup = out.with_name(f".{out.name}.old")
        if backup.exists():
            shutil.rmtree(backup)
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup)
    else:
        tmp.rename(out)


def run_unlearn(model: str, concepts_path: str, out: str | Path, config, overwrite: bool = False,
                lora_rank: int | None = None, progress=None, cancel=None, log=print, resume: bool = False,
                allow_pickle: bool = False, config_dir: str | Path | None = None, attack=None,
                phases: Phases | None = None, classifier=None) -> dict:
    """Unlearn a concept set from `model` and write model/, model.safetensors, loras/, grids, report.json and report.html.

    After each request the progress is checkpointed in `out/progress/` (`duge.progress`); an
    interrupted run leaves only that, and `resume=True` continues it from the next request,
    ending with the same weights as an uninterrupted run. The finished outputs replace `out`
    (progress included) in one rename. `allow_pickle`, `config_dir`: see `duge.models.load_pipeline`.

    Measuring follows `config.eval` (`measuring_mode`): the unedited model first, then after each
    request or after the last, with the built-in evaluator on the built-in world or `classifier`
    (a `duge.evaluation.ConceptClassifier` with `concepts()`) on another model. Every phase —
    loading, each request's images, training, measuring, the grid, writing — is reported to
    `phases` (`duge.phases`) as its work is done.

    `attack` (an AttackConfig): also attack every erased concept of the result (`duge.attacks`) and add a
    robustness section to report.json and report.html, with the attacks' images beside the plain prompt's
    in robustness/attacks.png (built-in world only: the evaluator judges the images).

    A `model` an earlier DUGE run wrote carries its manifest (`earlier_run`): what those requests erased stays
    erased for these (`resolve_concept_set(erased_before=...)`; what that changed is logged and listed in
    report.json's `notes`; the trainer counts them as erased too, `unlearn(erased_before=...)`), and the new
    manifest lists the earlier requests before these.

    Under `accelerate launch` with several processes (`duge.distributed`) every process trains on
    its share of each batch and only the main process measures and writes; the others return {}.
    """
    out = Path(out)
    phases = current_phases(phases)
    concept_set = load_concept_set(concepts_path)
    device = state = None
    if launched_distributed():
        state = start_distributed()
        device = state.device
        if resume:
            raise DugeError("--resume continues single-process runs only; run it without accelerate launch")
        if not state.is_main_process:
            _train_without_outputs(model, concept_set, config, device, allow_pickle, config_dir, progress, cancel)
            return {}
    if resume:
        require_progress(progress_folder(out))  # before minutes of loading and measuring
    tmp = prepare_output_folder(out, overwrite, resume)
    checkpoint = None
    try:
        with phases.phase("loading the model", 3, "part", "loading"):
            pipe = load_pipeline(model, torch_dtype=storage_dtype(config.dtype), config_dir=config_dir,
                                 allow_pickle=allow_pickle)
            phases.advance(1)
            builtin_world = uses_builtin_world(pipe)
            if attack is not None and not builtin_world:
                raise DugeError(f"--attack judges the attacks' images with the built-in evaluator, and '{model}' is "
                                "not a model of the built-in world; attack it with duge.attacks.attack_models and a "
                                "classifier for its concepts")
            backend = DiffusersBackend(pipe, device=device, dtype=config.dtype,
                                       gradient_checkpointing=config.gradient_checkpointing)
            earlier_rows, erased_before, erased_before_by = earlier_run(model, allow_pickle)
            notes: list[str] = []
            requests = resolve_concept_set(concept_set, builtin_world, config.setting, erased_before=erased_before,
                                           erased_before_by=erased_before_by, notes=notes)
            for note in notes:
                log(note)
            evaluator = builtin_evaluator() if builtin_world else None
            phases.advance(1)
            base_hash = model_hash(pipe)
            phases.advance(1)
        sample_batch = BUILTIN_SAMPLE_BATCH_SIZE if builtin_world else SAMPLE_BATCH_SIZE  # images per sampler call
        reader = classifier if classifier is not None else evaluator
        mode = measuring_mode(config.eval, reader is not None, str(model))
        evaluate, shown = None, ([], [])
        if mode != "none":
            measured_concepts = concepts_for(reader, builtin_world)
            shown = shown_prompts(requests, measured_concepts)  # the grid shows these prompts' measured images
            evaluate = measuring(backend, reader, measured_concepts, config.seed + EVALUATION_SEED_OFFSET, phases,
                                 steps=config.eval_steps,
                                 with_request_templates=not builtin_world, batch_size=sample_batch,
                                 keep_prompts=shown[0] + shown[1], keep=GRID_IMAGES)
        report: dict = {"model": str(model), "concept_set": concept_set.name, "method": config.method,
                        "setting": config.setting, "config": asdict(config), "eval": mode, "requests": [],
                        "processes": state.world if state is not None else 1}
        if notes:
            report["notes"] = notes
        t_start = time.time()
        inputs = run_inputs(str(model), base_hash, config, concept_set)
        resumed = None
        if resume:
            checkpoint, resumed, saved = ProgressCheckpoint.load(progress_folder(out), inputs)
            if saved.get("before") is not None:
                report["before"] = saved["before"]
            log(f"resuming after request {checkpoint.completed} of {len(concept_set.requests)} "
                f"({', '.join(f['target'] for f in checkpoint.files)} done)")
        else:
            checkpoint = ProgressCheckpoint(progress_folder(out), inputs)
            checkpoint.clear()
        shown_before = {}
        if evaluate and "before" not in report:
            report["before"] = evaluate(backend, requests, "measuring the unedited model")
            shown_before = getattr(evaluate, "shown", {})
        peak_before = _peak_memory_mb()
        after_request = evaluate
        if mode == "final":  # only once every request is done
            after_request = lambda b, done: evaluate(b, done) if len(done) == len(requests) else {}  # noqa: E731
        result = unlearn(backend, requests, config, concept_set.general_prompts,
                         image_filter=anchor_filter(backend, evaluator) if evaluator else None,
                         evaluate=after_request, progress=progress, cancel=cancel, resume=resumed, phases=phases,
                         on_request_done=lambda k, r, cache: checkpoint.save(k, r, cache, {"before": report.get("before")}),
                         erased_before=erased_before)
        for r in result.requests:
            entry = {"target": r.target, "seconds": round(r.seconds, 2), "steps": r.steps,
                     "final_losses": r.final_losses}
            for key in ("UA", "IRA", "CRA"):
                entry[key] = r.metrics.get(key)
            entry["details"] = {k: v for k, v in r.metrics.items() if k not in ("UA", "IRA", "CRA")}
            if r.adversarial:  # the attack prompts adversarial training found and trained on (duge.adversarial)
                entry["adversarial"] = r.adversarial
            report["requests"].append(entry)
        if result.requests and evaluate:
            last = result.requests[-1].metrics
            report["final"] = {k: last.get(k) for k in ("UA", "IRA", "CRA")}
            if last.get("H") is not None:  # their harmonic mean, where the measurement gives it
                report["final"]["H"] = last["H"]
            if "before" in report:
                report["final"].update(retention_ratios(last, report["before"]))
        report["seconds_total"] = round(time.time() - t_start, 2)
        report["peak_memory_mb"] = max(peak_before, _peak_memory_mb())

        edited = backend.edited_pipeline(result.total_delta)
        after_backend = DiffusersBackend(edited, device=backend.device, dtype=config.dtype)
        # the first and last measurements' own images when the run measured both; else sampled for the grid
        grid = measured_grid(shown_before, getattr(evaluate, "shown", {}), *shown) if result.requests else None
        if grid is None:
            prompts = comparison_prompts(requests)
            with phases.phase("before/after grid", 2 * GRID_IMAGES * len(prompts), "image", "grid"):
                grid = before_after_grid(
                    lambda p, seeds: sample_with_progress(backend, p, seeds, GRID_STEPS, 7.5, phases, True,
                                                          sample_batch),
                    lambda p, seeds: sample_with_progress(after_backend, p, seeds, GRID_STEPS, 7.5, phases, True,
                                                          sample_batch),
                    prompts, GRID_IMAGES, config.seed)
        # the earlier runs' rows first (a later run then still sees what they erased); base_model is the model
        # this run loaded, which this run's LoRAs are deltas of
        manifest = make_manifest(config.method, earlier_rows + manifest_rows(result, requests),
                                 base_model_hash=base_hash, base_model=str(model),
                                 extra={"config": asdict(config), "concept_set": concept_set.name,
                                        "earlier_requests": len(earlier_rows)})
        if attack is not None:
            with phases.phase("attacking the erased concepts", attack.budget * len(attack.attacks) * len(requests),
                              "UNet pass", "attacking"):
                report["robustness"] = robustness_section(after_backend, backend, evaluator, requests, attack,
                                                          tmp / ROBUSTNESS_FOLDER, progress=progress, phases=phases)
        with phases.phase("writing outputs", 5 + len(result.requests), "file", "writing"):
            save_diffusers_folder(edited, tmp / "model", manifest)
            phases.advance(1)
            save_single_file(edited, tmp / "model.safetensors", manifest)
            phases.advance(1)
            for k, r in enumerate(result.requests, start=1):
                name = "".join(ch if ch.isalnum() else "_" for ch in r.target)[:60]
                request_manifest = dict(manifest, request_index=len(earlier_rows) + k)
                save_lora(r.delta, tmp / "loras" / f"{k:02d}_{name}.safetensors", request_manifest, rank=lora_rank,
                          base_model=base_model_of_pipeline(edited))
                phases.advance(1)
            grid.save(tmp / "before_after.png")
            phases.advance(1)
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            phases.advance(1)
            write_report(tmp)  # report.html: the grids, the table and the charts in one self-contained page
            phases.advance(1)
        publish_output_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if checkpoint is not None and checkpoint.completed:
            log(f"stopped: nothing was written under '{out}' but the progress after request "
                f"{checkpoint.completed} ({checkpoint.folder}); continue with --resume")
        raise
    return report


ROBUSTNESS_FOLDER = "robustness"
ROBUSTNESS_IMAGES = 4  # images per row of robustness/attacks.png


def robustness_section(edited: DiffusersBackend, base: DiffusersBackend, evaluator, requests, attack, folder: Path,
                       progress=None, phases: Phases | None = None) -> dict:
    """Attack every erased concept of `edited` (`duge.attacks.attack_concepts`, `base` drawing the objectives'
    images); write FOLDER/attacks.png (per concept: the plain prompt's images, then each attack's, the same
    held-out seeds) and return the report's robustness entry."""
    concepts = erased_concepts(requests, evaluator, builtin_world=True)
    robustness = attack_concepts(edited, base, evaluator, concepts, attack,
                                 progress=_attack_progress(progress, current_phases(phases)))
    rows, labels = [], []
    for concept in robustness.concepts:
        found = {a.attack: a for a in concept.attacks}
        for label, images in concept.images.items():
            attack_result = found.get(label.removesuffix(" attack"))
            ua = attack_result.ua if attack_result is not None else concept.ua_plain
            prompt = attack_result.prompt if attack_result is not None else concept.prompt
            rows.append([to_pil(x) for x in images[:ROBUSTNESS_IMAGES]])
            labels.append(f"{concept.concept}, {label}: UA {ua:.2f}\n{prompt}")
    folder.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, labels, cell=128).save(folder / "attacks.png")
    entry = robustness.to_json()
    entry["images"] = f"{ROBUSTNESS_FOLDER}/attacks.png"
    return entry


def _attack_progress(progress, phases: Phases):
    """The attacks' progress: the UNet passes each attack step spent, counted on `phases`, and each step as the
    unlearning progress callback receives it."""
    spent: dict = {}  # UNet passes counted so far per (concept, attack)

    def report(info):
        if "total" in info:
            return
        key = (info["concept"], info["attack"])
        phases.advance(max(0, info["spent"] - spent.get(key, 0)))
        spent[key] = max(spent.get(key, 0), info["spent"])
        if progress is not None:
            progress({"request": f"attack {info['concept']}", "losses": {"total": info["loss"]}, "attack": info})

    return report


def earlier_run(model: str, allow_pickle: bool = False) -> tuple[list[dict], list[str], str]:
    """What an earlier DUGE run left on `model` (a folder or .safetensors file carrying a manifest,
    `duge.io.read_manifest`): (its manifest's request rows, every name they erased, the run as messages name
    it); ([], [], "") for a model without a manifest."""
    path = resolve_model_path(model, allow_pickle=allow_pickle)
    manifest = read_manifest(path) if path.is_dir() or path.suffix.lower() == ".safetensors" else None
    if manifest is None:
        return [], [], ""
    where = f"the DUGE manifest of '{model}'"
    erased = erased_in_manifest(manifest, where)
    return list(manifest.get("requests", [])), erased, f"an earlier run, per {where}"


def _train_without_outputs(model, concept_set, config, device, allow_pickle, config_dir, progress, cancel) -> None:
    """A non-main process of a data-parallel run: the same model, requests, cached images and batches as the
    main process (`duge.distributed`), its share of every step, nothing measured or written."""
    pipe = load_pipeline(model, torch_dtype=storage_dtype(config.dtype), config_dir=config_dir, allow_pickle=allow_pickle)
    builtin_world = uses_builtin_world(pipe)
    backend = DiffusersBackend(pipe, device=device, dtype=config.dtype, gradient_checkpointing=config.gradient_checkpointing)
    evaluator = builtin_evaluator() if builtin_world else None  # the anchor filter must drop the same images
    _, erased_before, erased_before_by = earlier_run(model, allow_pickle)
    requests = resolve_concept_set(concept_set, builtin_world, config.setting, erased_before=erased_before,
                                   erased_before_by=erased_before_by)
    unlearn(backend, requests, config, concept_set.general_prompts,
            image_filter=anchor_filter(backend, evaluator) if evaluator else None, progress=progress, cancel=cancel,
            erased_before=erased_before)


def _peak_memory_mb() -> float:
    """Peak resident memory of this process (CUDA: peak allocated) in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # deferred: POSIX only (Windows has no `resource`), and only on the CPU

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

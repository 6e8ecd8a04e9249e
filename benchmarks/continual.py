"""Continual unlearning on the built-in world: DUGE beside its baselines, request after request.

Every method (duge, esd-x, ca, ft-l2sp, uce) runs the same requests of `sequence10.yaml` in the
sequential setting, from the same unedited model, with the same seeds, and is measured after
every request by the same evaluation (duge.evaluation: UA, IRA, CRA, their harmonic mean H and
the Fréchet distance of the evaluator's features to the unedited model's samples on the
concept set's general prompts). The unedited model is measured once, on the same images seeds.

Cost: seconds per request (image caching + training, as `unlearn` times it; the measurement is
not included), seconds per training step (median gap between consecutive steps), and the peak
resident memory of the process while a request runs (also as the increase over the memory in
use when the request started, which is what the method itself adds): the kernel's high-water mark VmHWM from
/proc/self/status, reset before each request by writing 5 to /proc/self/clear_refs (CUDA: peak
allocated memory, reset per request). Where the reset is not allowed, a thread samples the
resident size every 10 ms instead (this is said in the JSON as `memory_measure`).

    python benchmarks/continual.py [--quick] [--json PATH] [--out DIR] [--methods duge,uce] [--requests N]
                                   [--steps N] [--eval-steps N] [--set [METHOD:]FIELD=VALUE ...]
    python benchmarks/continual.py --merge a/continual.json b/continual.json --out DIR

Writes DIR/continual.json (or --json PATH), DIR/erosion.png (UA, IRA, CRA and the distance vs
request number, one line per method; the unedited model dashed) and DIR/cost.png, and prints a
table. --quick: the first 3 requests, few steps and few samples (about 2–3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peak_memory import PeakMemory  # noqa: E402
from duge.paths import atomic_write_text  # noqa: E402

METHODS = ("duge", "esd-x", "ca", "ft-l2sp", "uce")


@dataclass
class Profile:
    """Everything a benchmark run samples and trains; --quick and the full run differ only here."""

    requests: int | None = None  # None: all of sequence10
    steps: int | None = None  # None: UnlearnConfig's default
    anchor_images: int | None = None
    related_images: int | None = None
    sampler_steps: int | None = None
    batch_size: int | None = None
    eval_steps: int = 20
    samples_per_prompt: int = 2
    retention_samples: int = 4
    distance_samples: int = 4
    config_overrides: dict = field(default_factory=dict)


FULL = Profile()
QUICK = Profile(requests=3, steps=12, anchor_images=4, related_images=1, sampler_steps=8, batch_size=2,
                eval_steps=8, samples_per_prompt=1, retention_samples=1, distance_samples=2)


# ---------------------------------------------------------------- memory


# ---------------------------------------------------------------- running


def _unlearn_config(method: str, profile: Profile, seed: int):
    """UnlearnConfig's defaults, the profile's sizes, then `config_overrides` ("field" or "method:field")."""
    from duge.trainer import UnlearnConfig

    config = UnlearnConfig(method=method, seed=seed)
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
    from duge.trainer import UnlearnConfig

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


def run_method(method: str, backend, concept_set, evaluation, image_filter, profile: Profile, memory: PeakMemory,
               seed: int, log=print, on_request=None) -> dict:
    """One method through every request; its metrics after each, its cost, or the error that stopped it.

    `on_request(partial_entry)` is called after each request's measurement with what is known so
    far (`unfinished: true`, the metrics of the requests done), for checkpoints of long runs.
    """
    from duge.errors import DugeError
    from duge.concepts import resolve_concept_set
    from duge.trainer import unlearn

    config = _unlearn_config(method, profile, seed)
    step_times: dict[str, list[float]] = {}
    peaks: list[float] = []
    partial: dict = {"config": asdict(config), "unfinished": True, "requests": []}

    def progress(info):
        step_times.setdefault(info["request"], []).append(time.perf_counter())

    def evaluate(b, requests_so_far):
        peaks.append((memory.peak_mb(), memory.peak_mb() - memory.start_mb))
        metrics = evaluation(b, requests_so_far)
        log(f"  {method:<8} request {len(requests_so_far):>2} ({requests_so_far[-1].target}): "
            f"UA {_fmt(metrics.get('UA'))} IRA {_fmt(metrics.get('IRA'))} CRA {_fmt(metrics.get('CRA'))} "
            f"dist {_fmt(metrics.get('distance'), 2)}")
        if on_request:
            partial["requests"].append({"index": len(requests_so_far), "target": requests_so_far[-1].target,
                                        "peak_memory_mb": peaks[-1][0], "peak_increase_mb": peaks[-1][1],
                                        **{k: v for k, v in metrics.items() if k != "dropped_anchor_images"}})
            on_request(partial)
        memory.reset()
        return metrics

    entry: dict = {"config": asdict(config), "requests": []}
    t0 = time.perf_counter()
    memory.reset()
    try:
        result = unlearn(backend, resolve_concept_set(concept_set, True, config.setting), config,
                         concept_set.general_prompts, image_filter=image_filter,
                         evaluate=evaluate, progress=progress)
    except DugeError as err:  # a diverged baseline is a result, not a crash of the benchmark
        entry["error"] = f"{type(err).__name__}: {err}"
        log(f"  {method}: stopped — {entry['error']}")
        return entry
    entry["total_seconds"] = time.perf_counter() - t0
    for k, r in enumerate(result.requests):
        times = step_times.get(r.target, [])
        gaps = [b - a for a, b in zip(times, times[1:])]
        m = r.metrics
        entry["requests"].append({
            "index": k + 1, "target": r.target,
            **{key: m.get(key) for key in ("UA", "IRA", "CRA", "H", "distance", "IRA_ratio", "CRA_ratio")},
            "last_request": m.get("last_request"),
            "seconds": r.seconds, "steps": r.steps if times else 0, "seconds_per_step": _median(gaps),
            "peak_memory_mb": peaks[k][0] if k < len(peaks) else None,
            "peak_increase_mb": peaks[k][1] if k < len(peaks) else None,
            "eval_seconds": m.get("eval_seconds"), "dropped_anchor_images": m.get("dropped_anchor_images"),
            "final_losses": r.final_losses,
            "UA_per_concept": m.get("UA_per_concept"), "accuracy_per_concept": m.get("accuracy_per_concept"),
        })
    rows = entry["requests"]
    if rows:
        last = rows[-1]
        entry["final"] = {key: last[key] for key in ("UA", "IRA", "CRA", "H", "distance", "IRA_ratio", "CRA_ratio")}
        entry["seconds_per_request"] = [row["seconds"] for row in rows]
        entry["mean_seconds_per_request"] = sum(entry["seconds_per_request"]) / len(rows)
        per_step = [row["seconds_per_step"] for row in rows if row["seconds_per_step"] is not None]
        entry["seconds_per_step"] = _median(per_step)
        entry["peak_memory_mb"] = max((row["peak_memory_mb"] for row in rows if row["peak_memory_mb"]), default=None)
        entry["peak_increase_mb"] = max((row["peak_increase_mb"] for row in rows
                                         if row["peak_increase_mb"] is not None), default=None)
    return entry


def run_benchmark(methods=METHODS, profile: Profile = FULL, model: str = "builtin", seed: int = 0,
                  eval_seed: int = 999, log=print, checkpoint=None) -> dict:
    """The whole benchmark as a JSON-ready dict (see the module doc).

    `checkpoint(result)` is called with the partial result after the unedited model and after
    each method, so a long run that is stopped keeps what it finished.
    """
    import torch

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import example_concept_set_path, load_concept_set, resolve_request
    from duge.evaluation import EvaluationSettings, RunEvaluation, world_measured_concepts
    from duge.models import load_pipeline
    from duge.world.callbacks import anchor_filter, builtin_evaluator, uses_builtin_world

    concept_set = load_concept_set(example_concept_set_path("sequence10"))
    if profile.requests is not None:
        concept_set.requests = concept_set.requests[: profile.requests]
    pipe = load_pipeline(model)
    if not uses_builtin_world(pipe):
        from duge.errors import DugeError

        raise DugeError(f"'{model}' is not a model of the built-in world; this benchmark measures with the built-in evaluator")
    backend = DiffusersBackend(pipe, dtype="float32")
    evaluator = builtin_evaluator()
    settings = EvaluationSettings(steps=profile.eval_steps, samples_per_prompt=profile.samples_per_prompt,
                                  retention_samples=profile.retention_samples,
                                  distance_samples=profile.distance_samples, seed=eval_seed)
    evaluation = RunEvaluation(backend, evaluator, world_measured_concepts(), settings,
                               general_prompts=list(concept_set.general_prompts))
    requests = [resolve_request(r, builtin_world=True) for r in concept_set.requests]
    memory = PeakMemory()
    out: dict = {
        "benchmark": "continual", "model": model, "concept_set": concept_set.name,
        "requests": [r.target for r in requests], "setting": "sequential", "seed": seed,
        "profile": asdict(profile), "evaluation": asdict(settings), "memory_measure": memory.method,
        "torch_threads": torch.get_num_threads(), "device": str(backend.device), "complete": False,
    }
    log(f"measuring the unedited model on {len(requests)} requests ...")
    base = evaluation.measure_base(requests)
    out["base"] = {"requests": [dict(entry, index=k + 1, target=requests[k].target)
                                for k, entry in enumerate(base["after_request"])],
                   "distance_floor": base.get("distance_floor"), "seconds": base["seconds"],
                   "UA_per_concept": base["UA_per_concept"], "accuracy_per_concept": base["accuracy_per_concept"]}
    image_filter = anchor_filter(backend, evaluator)
    out["methods"] = {}
    t0 = time.perf_counter()
    for method in methods:
        if checkpoint:
            checkpoint(out)
        log(f"{method}: {len(requests)} requests ...")
        def on_request(partial, method=method):
            out["methods"][method] = partial
            if checkpoint:
                checkpoint(out)

        out["methods"][method] = run_method(method, backend, concept_set, evaluation, image_filter, profile, memory,
                                            seed, log=log, on_request=on_request)
        out["seconds_methods"] = time.perf_counter() - t0
    memory.close()
    out["complete"] = True
    return out


def merge_results(results: list[dict]) -> dict:
    """One result from runs that differ only in their methods (same model, requests, seeds, sizes).

    The unedited model's numbers are the first run's (the others measured the same images);
    seconds_total is the longest run's. Raises SystemExit naming the first setting that differs.
    """
    same = ("model", "concept_set", "requests", "setting", "seed", "profile", "evaluation")
    first = results[0]
    for other in results[1:]:
        for key in same:
            if other.get(key) != first.get(key):
                raise SystemExit(f"--merge: the runs differ in {key!r}; only runs with the same settings combine")
    merged = dict(first, methods={}, merged_from=len(results))
    for result in results:
        merged["methods"].update(result.get("methods") or {})
    merged["complete"] = all(r.get("complete") for r in results)
    merged["seconds_total"] = max(r.get("seconds_total") or 0.0 for r in results)
    return merged


# ---------------------------------------------------------------- output


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _or_nan(value) -> float:
    return float("nan") if value is None else value


def format_table(result: dict) -> str:
    """Final numbers per method and the erosion per request, as text."""
    lines = []
    head = f"{'method':<9}{'UA':>7}{'IRA':>7}{'CRA':>7}{'H':>7}{'dist':>8}{'IRA/base':>9}{'CRA/base':>9}" \
           f"{'s/req':>8}{'s/step':>8}{'peak MiB':>10}{'+MiB':>7}"
    lines.append(head)
    base = result["base"]["requests"][-1] if result["base"]["requests"] else {}
    lines.append(f"{'unedited':<9}{_fmt(base.get('UA')):>7}{_fmt(base.get('IRA')):>7}{_fmt(base.get('CRA')):>7}"
                 f"{_fmt(base.get('H')):>7}{_fmt(result['base'].get('distance_floor'), 2):>8}")
    for name, entry in result["methods"].items():
        if "error" in entry:
            lines.append(f"{name:<9} {entry['error']}")
            continue
        f = entry.get("final", {})
        lines.append(f"{name:<9}{_fmt(f.get('UA')):>7}{_fmt(f.get('IRA')):>7}{_fmt(f.get('CRA')):>7}{_fmt(f.get('H')):>7}"
                     f"{_fmt(f.get('distance'), 2):>8}{_fmt(f.get('IRA_ratio')):>9}{_fmt(f.get('CRA_ratio')):>9}"
                     f"{_fmt(entry.get('mean_seconds_per_request'), 1):>8}{_fmt(entry.get('seconds_per_step'), 3):>8}"
                     f"{_fmt(entry.get('peak_memory_mb'), 0):>10}{_fmt(entry.get('peak_increase_mb'), 0):>7}")
    lines.append("")
    lines.append("after each request (UA / IRA / CRA / distance); unedited: its IRA / CRA on the same requests")
    targets = result["requests"]
    lines.append(f"{'':<9}" + "".join(f"{f'{k + 1}:{t}':>24}" for k, t in enumerate(targets)))
    lines.append(f"{'unedited':<9}" + "".join(
        f"{'  ' + _fmt(b.get('IRA'), 2) + ' / ' + _fmt(b.get('CRA'), 2):>24}" for b in result["base"]["requests"]))
    for name, entry in result["methods"].items():
        cells = [f"{_fmt(r.get('UA'), 2)}/{_fmt(r.get('IRA'), 2)}/{_fmt(r.get('CRA'), 2)}/{_fmt(r.get('distance'), 1)}"
                 for r in entry.get("requests", [])]
        lines.append(f"{name:<9}" + "".join(f"{c:>24}" for c in cells))
    lines.append("")
    lines.append(f"peak MiB: the process's peak while a request ran ({result['memory_measure']}); +MiB: that peak "
                 f"above the memory in use when the request started; {result['torch_threads']} torch threads on "
                 f"{result['device']}")
    return "\n".join(lines)


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """erosion.png (UA, IRA, CRA, distance vs request) and cost.png (seconds and peak memory per request)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = {name: e for name, e in result["methods"].items() if e.get("requests")}
    base = result["base"]["requests"]
    paths = []
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, title in zip(axes, ("UA", "IRA", "CRA", "distance"),
                              ("UA (erased stays erased)", "IRA (same kind kept)", "CRA (other kinds kept)",
                               "distance to the unedited model")):
        for name, entry in methods.items():
            xs = [r["index"] for r in entry["requests"] if r.get(key) is not None]
            ys = [r[key] for r in entry["requests"] if r.get(key) is not None]
            ax.plot(xs, ys, marker="o", label=name)
        if key in ("UA", "IRA", "CRA"):
            ax.plot([b["index"] for b in base], [b.get(key) for b in base], "k--", label="unedited")
        if key == "distance" and result["base"].get("distance_floor") is not None:
            ax.axhline(result["base"]["distance_floor"], color="k", linestyle="--", label="unedited (other seeds)")
        ax.set_title(title)
        ax.set_xlabel("request")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "distance":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    fig.suptitle(f"continual unlearning on the built-in world ({len(result['requests'])} sequential requests)")
    fig.tight_layout()
    paths.append(out_dir / "erosion.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in methods.items():
        xs = [r["index"] for r in entry["requests"]]
        axes[0].plot(xs, [_or_nan(r.get("seconds")) for r in entry["requests"]], marker="o", label=name)
        axes[1].plot(xs, [_or_nan(r.get("peak_increase_mb")) for r in entry["requests"]], marker="o", label=name)
    axes[0].set_title("seconds per request (caching + training)")
    axes[1].set_title("peak memory above the request's start, MiB")
    for ax in axes:
        ax.set_xlabel("request")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "cost.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 requests, few steps and samples (CI)")
    parser.add_argument("--json", default=None, help="where the JSON goes (default: OUT/continual.json)")
    parser.add_argument("--out", default="benchmark-results/continual", help="folder for the JSON and the plots")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--requests", type=int, default=None, help="only the first N requests")
    parser.add_argument("--steps", type=int, default=None, help="training steps per request (all methods)")
    parser.add_argument("--eval-steps", type=int, default=None, help="sampler steps of the measurement images")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="instead of running: combine the methods of runs made with the same settings "
                             "(e.g. methods split over processes) into one JSON, table and plots")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD:]FIELD=VALUE",
                        help="override an UnlearnConfig field for every method or one (repeatable), "
                             "e.g. --set duge:lambda_reg=0.01")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; expected a subset of {', '.join(METHODS)}")
    profile = Profile(**asdict(QUICK if args.quick else FULL))
    if args.requests is not None:
        profile.requests = args.requests
    if args.steps is not None:
        profile.steps = args.steps
    if args.eval_steps is not None:
        profile.eval_steps = args.eval_steps
    profile.config_overrides.update(parse_overrides(args.set))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out_dir / "continual.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save(result: dict) -> None:
        result["seconds_total"] = time.perf_counter() - t0
        if not args.no_plots and result.get("methods"):
            result["plots"] = [str(p) for p in write_plots(result, out_dir)]
        atomic_write_text(json_path, json.dumps(result, indent=2), overwrite=True)

    if args.merge:
        result = merge_results([json.loads(Path(p).read_text()) for p in args.merge])
        t0 -= result["seconds_total"]
    else:
        result = run_benchmark(methods, profile, model=args.model, seed=args.seed, checkpoint=save)
    save(result)
    print(format_table(result))
    print(f"\nwrote {json_path}" + ("" if args.no_plots else f", {out_dir / 'erosion.png'}, {out_dir / 'cost.png'}")
          + f" in {result['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

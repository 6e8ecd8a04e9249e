"""The `duge` command line.

Settings come from `duge.config` (`add_config_options`). A command imports the model libraries
(torch, diffusers) inside its function, so that `duge --help` and argument errors are quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from .concepts import example_concept_set_path, load_concept_set, resolve_concept_set
from .config import AttackConfig, UnlearnConfig, method_config
from .errors import DugeError
from .paths import atomic_write_text, check_writable
from .phases import TqdmPhases
from .report import write_report
from .world.render import write_rendered_scenes
from .world.vocabulary import CONCEPTS, GENERIC_WORD


def _cmd_world_render(args) -> int:
    write_rendered_scenes(args.n, args.seed, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {args.n} scenes and labels.jsonl to {args.out}")
    return 0


def _cmd_world_concepts(args) -> int:
    if args.json:
        doc = {
            "concepts": [{"name": c.name, "kind": c.kind, "names": list(c.names)} for c in CONCEPTS],
            "generic_words": GENERIC_WORD,
        }
        print(json.dumps(doc, indent=2))
    else:
        for c in CONCEPTS:
            print(f"{c.kind:<7} {c.name:<10} names: {', '.join(c.names)}")
    return 0


def _cmd_world_train(args) -> int:
    from .world.model import WEIGHTS_DIR  # deferred: torch
    from .world.train import WorldTrainConfig, train_world

    cfg = WorldTrainConfig(seed=args.seed, unet_steps=args.unet_steps)
    stages = tuple(args.stages.split(","))
    out = Path(args.out) if args.out else WEIGHTS_DIR
    record = train_world(cfg, out, Path(args.work), stages=stages)
    record_path = out / "training_record.json"
    record["command"] = " ".join(["duge"] + sys.argv[1:])
    record_path.write_text(json.dumps(record, indent=2))
    return 0


def _cmd_sample(args) -> int:
    from .sampling import run_sample_command  # deferred: torch, diffusers

    return run_sample_command(args)


def _unlearn_config(args) -> UnlearnConfig:
    """The config of `duge unlearn` / `duge demo` / `duge plan`: UnlearnConfig's defaults, the method's own
    (duge.methods: a baseline's paper settings), and what was given."""
    given = {f.name: getattr(args, f.name) for f in fields(UnlearnConfig) if hasattr(args, f.name)}
    return method_config(given.pop("method", "duge"), **given)


def _run_unlearn_job(model: str, concepts: str, out: str, config, overwrite: bool, lora_rank, resume: bool = False,
                     allow_pickle: bool = False, config_dir: str | None = None, attack=None) -> int:
    phases = TqdmPhases()  # one bar per phase: loading, each request's images and training, measuring, writing
    run_unlearn = load_libraries(phases).run_unlearn

    def progress(info):
        phases.set_postfix(loss=f"{info['losses'].get('total', 0):.4f}")

    report = run_unlearn(model, concepts, out, config, overwrite=overwrite, lora_rank=lora_rank, progress=progress,
                         log=phases.write, resume=resume, allow_pickle=allow_pickle, config_dir=config_dir,
                         attack=attack, phases=phases)
    if not report:  # a non-main process of `accelerate launch`: the main process writes
        return 0
    print(f"wrote {out}: model/, model.safetensors, loras/, before_after.png, report.json, report.html")
    final = report.get("final") or {}
    if final:
        print("final: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items() if isinstance(v, (int, float))))
    robustness = report.get("robustness")
    if robustness:
        print(f"robustness: UA of the plain prompts {robustness['UA_plain']:.3f}, post-attack "
              f"{robustness['post_attack_UA']:.3f} (report.html, robustness/attacks.png)")
    seconds = ", ".join(f"{kind} {t:.0f} s" for kind, t in phases.seconds.items())
    print(f"time per phase: {seconds}; open {Path(out) / 'report.html'} to see the run")
    return 0


def load_libraries(phases):
    """The `duge.run` module, imported as a run's first phase (it imports torch and diffusers: seconds)."""
    with phases.phase("loading torch and diffusers", 1, "part", "loading"):
        from . import run  # deferred: torch and diffusers, loaded as this phase

        phases.advance(1)
    return run


def torch_cuda_available() -> bool:
    import torch  # deferred: only `duge plan` asks

    return torch.cuda.is_available()


def _cmd_plan(args) -> int:
    from .plan import meta_pipeline, plan_run  # deferred: torch, diffusers

    config = _unlearn_config(args)
    related = 1
    requests = []
    if args.concepts:
        requests = load_concept_set(args.concepts).requests
        related = max((len(r.preserve) for r in requests), default=0)
    pipe = meta_pipeline(args.model, args.config)
    vram = args.vram
    if vram is None and (args.device or ("cuda" if torch_cuda_available() else "cpu")) == "cuda" and torch_cuda_available():
        import torch  # deferred, as above

        vram = torch.cuda.get_device_properties(0).total_memory / 2**30
    plans = []
    for spec in requests or [None]:
        if spec is not None and spec.steps:
            config.steps = spec.steps
        plan = plan_run(pipe, config, str(args.model), args.resolution, args.device, args.tflops,
                        related_concepts=len(spec.preserve) if spec is not None else related, vram_gib=vram)
        args.tflops = plan.tflops  # measure once
        if spec is not None:
            print(f"request '{spec.target}':")
        print(plan.table())
        plans.append(plan.to_json())
    if args.json:
        atomic_write_text(args.json, json.dumps(plans if len(plans) > 1 else plans[0], indent=2), overwrite=True)
    return 0


def _cmd_unlearn(args) -> int:
    return _run_unlearn_job(args.model, args.concepts, args.out, _unlearn_config(args), args.overwrite, args.lora_rank,
                            resume=args.resume, allow_pickle=args.allow_pickle, config_dir=args.config,
                            attack=_attack_config(args, prefix="attack_") if args.attack else None)


def _cmd_demo(args) -> int:
    config = _unlearn_config(args)
    if config.eval == "auto":  # the demo measures the unedited model, then the result of the last request
        config.eval = "final"
    return _run_unlearn_job("builtin", str(example_concept_set_path("demo")), args.out, config,
                            args.overwrite, args.lora_rank, resume=args.resume)


def _cmd_eval(args) -> int:
    phases = TqdmPhases()
    load_libraries(phases)
    # deferred: the model libraries (torch, diffusers) load only for commands that need them
    from .backends.diffusers_backend import DiffusersBackend
    from .models import load_pipeline
    from .world.callbacks import builtin_evaluator, uses_builtin_world, world_evaluate

    concept_set = load_concept_set(args.concepts)
    with phases.phase("loading the model", 1, "part", "loading"):
        pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
        phases.advance(1)
    if not uses_builtin_world(pipe):
        raise DugeError(f"'{args.model}' is not a model of the built-in world, and `duge eval` has no classifier "
                        "for it; score it with a classifier of your own (duge.evaluation.ConceptClassifier)")
    requests = resolve_concept_set(concept_set, builtin_world=True)
    steps = getattr(args, "eval_steps", UnlearnConfig.eval_steps)
    evaluate = world_evaluate(DiffusersBackend(pipe), builtin_evaluator(), args.seed, steps, phases=phases)
    measured = evaluate(None, requests, f"measuring '{args.model}'")
    metrics = {"model": args.model, "concept_set": concept_set.name, "eval_steps": steps,
               **{k: measured[k] for k in ("UA", "IRA", "CRA", "UA_per_concept", "accuracy_per_concept")}}
    text = json.dumps(metrics, indent=2)
    if args.json:
        atomic_write_text(args.json, text, overwrite=True)
    print(text)
    return 0


def _attack_config(args, prefix: str = ""):
    """An AttackConfig from the options `_add_attack_options(p, prefix)` added: its defaults, and what was given."""
    config = AttackConfig(**{f.name: getattr(args, prefix + f.name) for f in fields(AttackConfig)
                             if hasattr(args, prefix + f.name)})
    config.validate()
    return config


def _cmd_attack(args) -> int:
    from .attacks import attack_models  # deferred: torch

    config = _attack_config(args)
    check_writable(args.json, args.overwrite)  # refuse before minutes of work
    with tqdm(total=None, desc="attacking", unit="pass") as bar:
        last = {"key": None, "spent": 0}

        def progress(info):
            if "total" in info:  # the passes every attack on every concept may spend
                bar.total = info["total"]
                bar.refresh()
                return
            key = (info["concept"], info["attack"])
            bar.update(info["spent"] - (last["spent"] if key == last["key"] else 0))
            last.update(key=key, spent=info["spent"])
            bar.set_postfix(concept=info["concept"], attack=info["attack"], loss=f"{info['loss']:.4f}")

        report = attack_models(args.model, args.base, args.concepts, config, progress=progress,
                               allow_pickle=args.allow_pickle, config_dir=args.config, log=tqdm.write)
    doc = {"model": args.model, "base": args.base, "concept_set": args.concepts, **report.to_json()}
    atomic_write_text(args.json, json.dumps(doc, indent=2), overwrite=args.overwrite)
    print(format_robustness(report))
    print(f"wrote {args.json}")
    return 0


def format_robustness(report) -> str:
    """Per concept: UA of the plain prompt, each attack's UA, what it found and its cost; then the mean."""
    lines = [f"{'concept':<12}{'UA plain':>9}{'attack':>11}{'UA':>7}{'passes':>8}{'seconds':>9}  found"]
    for c in report.concepts:
        for k, a in enumerate(c.attacks or [None]):
            head = f"{c.concept:<12}{c.ua_plain:>9.3f}" if k == 0 else " " * 21
            if a is None:
                lines.append(head)
                continue
            found = a.prompt + (f"  (nearest words: {', '.join(a.nearest_tokens)})" if a.nearest_tokens else "")
            lines.append(f"{head}{a.attack:>11}{a.ua:>7.3f}{a.unet_passes:>8}{a.seconds:>9.1f}  {found}")
        lines.append(f"{'':<21}{'post-attack':>11}{c.post_attack_ua:>7.3f}")
    if report.concepts:
        lines.append(f"mean UA: plain prompt {report.ua_plain:.3f}, post-attack {report.post_attack_ua:.3f} "
                     f"(images from held-out seeds, judged by the classifier)")
    return "\n".join(lines)


def _cmd_inspect(args) -> int:
    from .io import read_manifest  # deferred: torch

    manifest = read_manifest(args.file)
    if manifest is None:
        print(f"{args.file}: no DUGE manifest")
        return 1
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_report(args) -> int:
    print(f"wrote {write_report(args.dir)}")
    return 0


def _on_off_auto(text: str):
    values = {"auto": "auto", "on": True, "off": False}
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return values[text]


def _rows_or_auto(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 (the whole batch) or a number of rows, got {text!r}")
    return value


# How the command line reads the settings whose type is not their default's; earlier names still accepted.
CONFIG_PARSING = {
    "gradient_checkpointing": {"type": _on_off_auto, "nargs": "?", "const": True, "metavar": "auto|on|off"},
    "micro_batch_size": {"type": _rows_or_auto, "metavar": "auto|N"},
    "memory_budget_gb": {"type": float, "metavar": "GIB"},
    "image_cache_dir": {"type": str, "metavar": "DIR"},
    "adversarial_every": {"type": int, "metavar": "N"},
    "related_batch_size": {"type": int, "metavar": "N"},
}
CONFIG_ALIASES = {"learning_rate": ["--lr"], "memory_budget_gb": ["--memory-budget", "--memory-budget-gib"],
                  "image_cache_dir": ["--cache-dir"], "adversarial_every": ["--adversarial"]}
UNLEARN_SETTINGS = tuple(f.name for f in fields(UnlearnConfig) if f.name != "attention_layers")
PLAN_SETTINGS = ("method", "setting", "steps", "batch_size", "replay_batch_size", "lambda_prior", "anchor_guidance",
                 "trainable", "trainable_mode", "trainable_rank", "dtype", "anchor_images", "related_images",
                 "sampler_steps", "gradient_checkpointing", "micro_batch_size")  # what plan_run reads


def _show(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "on", False: "off"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_options(p, names: tuple[str, ...]) -> None:
    """`--<field-name>` for each named UnlearnConfig field, with its help, choices and default from
    `duge.config` (the one source); a setting not given keeps the config's default."""
    defaults = UnlearnConfig()
    for f in fields(UnlearnConfig):
        if f.name not in names:
            continue
        default = getattr(defaults, f.name)
        options = {"type": type(default), **CONFIG_PARSING.get(f.name, {})}
        if f.metadata["choices"]:
            options["choices"] = f.metadata["choices"]
        p.add_argument("--" + f.name.replace("_", "-"), *CONFIG_ALIASES.get(f.name, []), dest=f.name,
                       default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {_show(default)})", **options)


def _add_unlearn_options(p, default_out=None) -> None:
    p.add_argument("--out", required=default_out is None, default=default_out, help="output folder")
    p.add_argument("--lora-rank", type=int, default=None, help="rank of the exported LoRAs (default: exact)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the progress it saved in OUT/progress/ (same settings)")
    add_config_options(p, UNLEARN_SETTINGS)


def _add_attack_options(p, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """`--<prefix><field-name>` for each AttackConfig field not in `skip`, with its help, choices and default from
    `duge.config`, as `add_config_options` does for UnlearnConfig; a setting not given keeps the default."""
    defaults = AttackConfig()
    for f in fields(AttackConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        p.add_argument("--" + (prefix + f.name).replace("_", "-"), dest=prefix + f.name, type=type(default),
                       choices=f.metadata["choices"], default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {_show(default)})")


def _add_config_dir(p) -> None:
    p.add_argument("--config", default=None, metavar="DIR",
                   help="for a single-file checkpoint: a local diffusers folder of its architecture (configs and "
                        "tokenizers; no weights needed); nothing is downloaded")


def _add_allow_pickle(p) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickled .ckpt/.pt/.bin checkpoint with torch.load(weights_only=True); "
                        "without it only safetensors are read (see SECURITY.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duge", description="Continual concept unlearning for diffusion models (DUGE).")
    sub = parser.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="the built-in world: scenes, concepts, training").add_subparsers(
        dest="world_command", required=True
    )
    p = world.add_parser("render", help="render scenes with ground-truth labels")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for PNGs and labels.jsonl")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_world_render)

    p = world.add_parser("concepts", help="list every concept with its kind and names")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_world_concepts)

    p = world.add_parser("train", help="train the evaluator, VAE, text encoder and UNet of the built-in model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, default=20_000)
    p.add_argument("--stages", default="evaluator,vae,unet", help="comma-separated subset of evaluator,vae,unet")
    p.add_argument("--out", default=None, help="where the weights go (default: the package's weights folder)")
    p.add_argument("--work", default=".duge-train", help="scratch folder: checkpoints, logs, VAE")
    p.set_defaults(func=_cmd_world_train)

    p = sub.add_parser("sample", help="sample images from a model")
    p.add_argument("--model", default="builtin", help="'builtin' or a diffusers folder")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--out", required=True, help="a .png for a grid, else a folder")
    p.add_argument("--overwrite", action="store_true")
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("unlearn", help="erase a concept set's requests from a model, in order")
    p.add_argument("--model", default="builtin", help="'builtin', a diffusers folder or a .safetensors checkpoint")
    p.add_argument("--concepts", required=True, help="concept set (JSON or YAML)")
    _add_unlearn_options(p)
    p.add_argument("--attack", action="store_true",
                   help="after unlearning, attack every erased concept (prompt search and concept inversion, "
                        "`duge attack`) and add a robustness section to report.json and report.html (built-in world)")
    _add_attack_options(p, prefix="attack_", skip=("attack",))
    _add_allow_pickle(p)
    _add_config_dir(p)
    p.set_defaults(func=_cmd_unlearn)

    p = sub.add_parser("plan", help="estimated peak memory and time per request of `duge unlearn` with these settings")
    p.add_argument("--model", required=True, help="'builtin', a diffusers folder, a .safetensors checkpoint, or a "
                                                  "reference layout: sd15, sd21, sdxl (duge/configs)")
    p.add_argument("--concepts", default=None, help="concept set: the requests' steps and preserved concepts")
    _add_config_dir(p)
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="plan for this device (default: this machine's)")
    p.add_argument("--tflops", type=float, default=None, help="device matmul throughput (default: measured here)")
    add_config_options(p, PLAN_SETTINGS)
    p.add_argument("--vram", type=float, default=None, metavar="GIB",
                   help="the device's memory, for the auto memory settings (default: this machine's GPU's; "
                        "none: no limit)")
    p.add_argument("--json", default=None, help="also write the plan here")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("demo", help="erase an object, a colour and a style from the built-in model (measuring the "
                                        "unedited model and the result of the last request: --eval final)")
    _add_unlearn_options(p, default_out="duge-demo")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("eval", help="UA / IRA / CRA and per-concept accuracy of a built-in-world model")
    p.add_argument("--model", default="builtin")
    p.add_argument("--concepts", required=True, help="concept set whose targets count as erased")
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--seed", type=int, default=0)
    add_config_options(p, ("eval_steps",))
    _add_allow_pickle(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("attack", help="does an erased concept come back? prompt search and concept inversion "
                                      "against an edited model, judged on held-out seeds")
    p.add_argument("--model", required=True, help="the edited model: a diffusers folder or a .safetensors checkpoint")
    p.add_argument("--base", required=True, help="the model it was edited from ('builtin', a folder or a file): it "
                                                 "draws the images of each concept the attacks aim at")
    p.add_argument("--concepts", required=True, help="concept set whose targets are attacked")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--overwrite", action="store_true")
    _add_attack_options(p)
    _add_allow_pickle(p)
    _add_config_dir(p)
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser("inspect", help="print the DUGE manifest of a .safetensors file or model folder")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("report", help="write DIR/report.html from a `duge unlearn` or continual-benchmark folder")
    p.add_argument("dir", help="the output folder of `duge unlearn` (or of benchmarks/continual.py)")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DugeError as err:
        print(f"duge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("duge: interrupted; nothing was written under the final names (a run's progress/ can be "
              "continued with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

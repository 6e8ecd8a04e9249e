"""The `duge` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_world_render(args) -> int:
    from .world.render import write_rendered_scenes

    write_rendered_scenes(args.n, args.seed, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {args.n} scenes and labels.jsonl to {args.out}")
    return 0


def _cmd_world_concepts(args) -> int:
    from .world.vocabulary import CONCEPTS, GENERIC_WORD

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
    from .world.model import WEIGHTS_DIR
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
    from .sampling import run_sample_command

    return run_sample_command(args)


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
    p.set_defaults(func=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import DugeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DugeError as err:
        print(f"duge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("duge: interrupted; nothing was written under the final names", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

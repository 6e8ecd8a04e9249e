"""Is an object's UA bounded by what its anchor draws, and what does `anchor_guidance` change?

DUGE steers a target's prompts towards its anchor's predictions. On the built-in world an object's anchor is
"shape", and the unedited model's "shape" draws every object now and then. If the edit mapped the target
exactly onto its anchor, it would still draw the target as often as the anchor does. This probe tests that,
for each target of a concept set (default: the objects of the tuning-only sequence `method_tuning10`, never
the reported ones):

1. the share of the unedited model's images of the anchor, in the held-out UA templates
   (`duge.evaluation.PARAPHRASE_TEMPLATES` with the anchor's word), that the built-in evaluator reads as
   the target;
2. for each `--guidance` η: the target erased ALONE (one request, its preserved concepts, DUGE's defaults
   otherwise) and its UA on the same held-out prompts under every name of the target, with what the
   edited model draws instead.

    python benchmarks/anchor_probe.py [--concepts SET.yaml] [--targets square,cross] [--guidance 0.5,1,2]
                                      [--steps N] [--samples 16] [--json PATH]

Prints one row per target and η, and writes benchmarks/results/method/anchor_probe.json. Measuring seeds
(`--seed`, default 5000) are not the training seeds. One torch thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=str(ROOT / "benchmarks" / "tuning" / "method_tuning10.yaml"))
    parser.add_argument("--targets", default=None, help="comma-separated targets of the set (default: its objects)")
    parser.add_argument("--guidance", default="0.5,1,2", help="comma-separated anchor_guidance values to erase with")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each request (default: DUGE's)")
    parser.add_argument("--samples", type=int, default=16, help="images per held-out prompt")
    parser.add_argument("--seed", type=int, default=5000, help="measuring seed (not a training seed)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "method" / "anchor_probe.json"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import ConceptSet, load_concept_set, render_prompt, resolve_concept_set
    from duge.config import UnlearnConfig, method_config
    from duge.evaluation import find_concept, world_measured_concepts
    from duge.models import load_pipeline
    from duge.trainer import unlearn
    from duge.world.callbacks import builtin_evaluator

    torch.set_num_threads(1)
    concept_set = load_concept_set(args.concepts)
    requests = resolve_concept_set(concept_set, builtin_world=True, setting="independent")
    measured = world_measured_concepts()
    wanted = args.targets.split(",") if args.targets else [r.target for r in requests if r.kind == "object"]
    evaluator = builtin_evaluator()
    base = DiffusersBackend(load_pipeline("builtin"), dtype="float32")
    steps, guidance = UnlearnConfig.eval_steps, 7.5  # as duge.measuring draws the benchmarks' images

    def read(backend, prompts, kind):
        labels = []
        for prompt in prompts:
            labels += evaluator.predict(backend.generate([prompt] * args.samples, args.seed, steps, guidance))[kind]
        return labels

    rows = []
    for request in (r for r in requests if r.target in wanted):
        concept = find_concept(request.target, measured)
        anchor_prompts = [render_prompt(t, request.anchor) for t in concept.paraphrase_templates]
        anchor_labels = read(base, anchor_prompts, concept.kind)
        anchor_share = float(np.mean([label == concept.name for label in anchor_labels]))
        held_out = [render_prompt(t, name) for t in concept.paraphrase_templates for name in concept.names]
        for eta in (float(x) for x in args.guidance.split(",")):
            config = method_config("duge", seed=0, anchor_guidance=eta,
                                   **({"steps": args.steps} if args.steps else {}))
            found = {}

            def evaluate(edited, _requests, found=found, concept=concept, held_out=held_out):
                labels = read(edited, held_out, concept.kind)
                found["UA"] = float(np.mean([label != concept.name for label in labels]))
                found["draws"] = dict(collections.Counter(labels).most_common(4))
                return {}

            single = ConceptSet(concept_set.name, [next(q for q in concept_set.requests if q.target == request.target)],
                                concept_set.general_prompts)
            unlearn(base, resolve_concept_set(single, builtin_world=True), config, single.general_prompts,
                    evaluate=evaluate)
            row = {"target": request.target, "anchor": request.anchor, "anchor_shows_target": anchor_share,
                   "anchor_guidance": eta, "steps": config.steps, "UA_alone": found["UA"],
                   "edited_draws": found["draws"]}
            rows.append(row)
            print(f"{row['target']:<10} anchor '{row['anchor']}' shows it {anchor_share:.2f}  eta {eta:<4g} "
                  f"UA alone {found['UA']:.2f}  draws {found['draws']}", flush=True)
    out = {"concepts": args.concepts, "samples_per_prompt": args.samples, "seed": args.seed, "sampler_steps": steps,
           "rows": rows}
    atomic_write_text(Path(args.json), json.dumps(out, indent=2), overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much of a target the output-space erasure removes, and how much of every other concept with it.

For each chosen request of a concept set (default: three objects of the tuning-only `method_tuning10`,
at their place in its sequence), on the UNEDITED model's K/V projections W: the directions Q that
`duge.output_erasure.output_directions` picks for each `--epsilon` and `--rank`, and

- own: the share of the target's output energy they remove, tr(QᵀA Q)/tr(A) with A = W·M·Wᵀ and M the
  second moment of the target-minus-anchor text states (`duge.uce.uce_embeddings`), mean over layers;
- the same share for every other concept of the built-in world (its own target-minus-anchor states):
  what the projection takes from a concept that must stay; the four most affected are printed.

No training and no image: it explains why a larger rank or ε erases more of the target only by taking
more of its neighbours (docs/method.md, "Output-space erasure").

    python benchmarks/output_erasure_energy.py [--concepts SET.yaml] [--requests 1,7,9] [--rank 2,4]
                                               [--epsilon 0.1,1,10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=str(ROOT / "benchmarks" / "tuning" / "method_tuning10.yaml"))
    parser.add_argument("--requests", default="1,7,9", help="1-based positions of the requests in the sequence")
    parser.add_argument("--rank", default="2,4")
    parser.add_argument("--epsilon", default="0.1,1,10")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "method" / "output_erasure_energy.json"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import ConceptSet, ConceptRequest, load_concept_set, resolve_concept_set
    from duge.evaluation import world_concepts
    from duge.models import load_pipeline
    from duge.output_erasure import output_directions
    from duge.preservation import is_text_projection, preservation_second_moment, run_preserved_prompts
    from duge.uce import uce_embeddings

    torch.set_num_threads(1)
    pipe = load_pipeline("builtin")
    backend = DiffusersBackend(pipe, dtype="float32")
    concept_set = load_concept_set(args.concepts)
    requests = resolve_concept_set(concept_set, builtin_world=True)
    weights = {name: module.weight.detach().double() for name, module in pipe.unet.named_modules()
               if is_text_projection(name) and hasattr(module, "weight")}

    def difference_moment(request) -> torch.Tensor:  # [d, d]: the target-minus-anchor states' second moment
        erase, guide, _ = uce_embeddings(backend, [request])
        difference = (erase - guide).double()
        return difference.T @ difference / len(difference)

    every = resolve_concept_set(ConceptSet("every concept", [ConceptRequest(target=c.name) for c in world_concepts()]),
                                builtin_world=True, setting="independent")
    moments = {r.target: difference_moment(r) for r in every}
    rows = []
    with torch.no_grad():
        for position in (int(x) for x in args.requests.split(",")):
            k = position - 1
            request = requests[k]
            own_moment = difference_moment(request)
            protected = preservation_second_moment(
                backend.encode_prompts, run_preserved_prompts([request], requests[:k], requests,
                                                              concept_set.general_prompts)).double()
            for epsilon in (float(x) for x in args.epsilon.split(",")):
                for rank in (int(x) for x in args.rank.split(",")):
                    share = {name: 0.0 for name in moments}
                    own = 0.0
                    for weight in weights.values():
                        q = output_directions(weight, own_moment, protected, rank, epsilon)  # [out, rank]

                        def removed(moment, weight=weight, q=q) -> float:  # share of W·M·Wᵀ's trace along q
                            energy = weight @ moment @ weight.T
                            return float((q.T @ energy @ q).trace() / energy.trace()) / len(weights)

                        own += removed(own_moment)
                        for name, moment in moments.items():
                            share[name] += removed(moment)
                    others = sorted(((v, n) for n, v in share.items() if n != request.target), reverse=True)
                    row = {"request": position, "target": request.target, "epsilon": epsilon, "rank": rank,
                           "own_removed": own, "others_removed": {n: v for v, n in others}}
                    rows.append(row)
                    print(f"{position:>2} {request.target:<10} eps {epsilon:<5g} rank {rank}: own {own:.3f}; most "
                          "affected others " + ", ".join(f"{n} {v:.3f}" for v, n in others[:4]), flush=True)
    atomic_write_text(Path(args.json), json.dumps({"concepts": args.concepts, "rows": rows}, indent=2),
                      overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

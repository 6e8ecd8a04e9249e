"""The closed-form output-space erasure ALONE, on the unedited built-in model (docs/method.md, "Output-space
erasure": the probe behind its first bullet and the README's "star" numbers), in its FIRST version, as measured.

For each attn2.to_k / to_v weight W0 [out, in]:

    A = W0·D·W0ᵀ    D: second moment of the target-minus-anchor text states (the same template, position by
                    position, from the target's word on)
    B = W0·C·W0ᵀ + κ·(mean eigenvalue)·I    C: the penalty's second moment of what must stay
    A, B each scaled to trace 1;  Q = the top-r eigenvectors of A − κ·B;  W' = (I − QQᵀ)·W0, no training.

Then UA / IRA / CRA (`duge.measuring`, seed 999) and, with `--attack`, benchmarks/attack.py's inversion at the
default budget. The library's `duge.output_erasure` takes generalised eigenvectors instead (A − κB eroded ten
requests).

    python benchmarks/output_erasure_probe.py --targets star --ranks 1,2 --kappa 1.0 --attack [--json PATH]

Prints one row per rank and writes benchmarks/results/method/output_erasure_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from duge.paths import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORTED_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"  # the layer whose numbers are printed


def difference_moment(backend, requests) -> "torch.Tensor":
    """D [d, d] (float64, scaled to trace d): the second moment of target-minus-anchor text states, aligned by
    template, every position from the target's word on."""
    import torch

    from duge.concepts import render_prompt

    prompts, words, anchors = [], [], []
    for request in requests:
        for template in request.templates:
            for word in (request.target, *request.aliases):
                prompts.append(render_prompt(template, word))
                words.append(word)
                anchors.append(render_prompt(template, request.anchor))
    difference = backend.encode_prompts(prompts).double() - backend.encode_prompts(anchors).double()  # [N, L, d]
    indices, mask = backend.token_indices(prompts, words)
    rows = torch.cat([difference[i, int(indices[i][mask[i]].min()):] for i in range(len(prompts))])  # [n, d]
    moment = rows.T @ rows / len(rows)
    return moment * (moment.shape[0] / torch.trace(moment))


def projected_weight(weight, difference, protected, rank: int, kappa: float):
    """(W' = (I − QQᵀ)·W0, Q, A, B, eigenvalues of A − κB descending) for one projection (module doc)."""
    import torch

    a = weight @ difference @ weight.T
    b = weight @ protected @ weight.T
    b = b + kappa * torch.trace(b) / b.shape[0] * torch.eye(b.shape[0], dtype=b.dtype)
    a, b = a / torch.trace(a), b / torch.trace(b)
    values, vectors = torch.linalg.eigh(a - kappa * b)  # ascending
    q, _ = torch.linalg.qr(vectors.flip(1)[:, :rank])
    return weight - q @ (q.T @ weight), q, a, b, values.flip(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="star", help="comma-separated concepts erased together")
    parser.add_argument("--ranks", default="1,2", help="comma-separated ranks r (0: the unedited model)")
    parser.add_argument("--kappa", type=float, default=1.0)
    parser.add_argument("--attack", action="store_true", help="also attack each model with the inversion")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "method" / "output_erasure_probe.json"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from attack import SharedAttacks
    from duge.attacks import erased_concepts
    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import parse_concept_set, resolve_concept_set
    from duge.config import AttackConfig
    from duge.evaluation import world_measured_concepts
    from duge.measuring import measuring
    from duge.models import load_pipeline
    from duge.preservation import is_text_projection, preservation_second_moment, run_preserved_prompts
    from duge.world.callbacks import builtin_evaluator

    torch.set_num_threads(1)
    targets, ranks = args.targets.split(","), [int(x) for x in args.ranks.split(",")]
    base_pipe = load_pipeline("builtin")
    base = DiffusersBackend(base_pipe, dtype="float32")
    evaluator = builtin_evaluator()
    concept_set = parse_concept_set("name: probe\nrequests:\n" + "".join(f"  - target: {t}\n" for t in targets))
    requests = resolve_concept_set(concept_set, builtin_world=True)
    with torch.no_grad():
        difference = difference_moment(base, requests)
        protected = preservation_second_moment(
            base.encode_prompts, run_preserved_prompts(requests, [], requests, concept_set.general_prompts)).double()
    originals = {name: module.weight.detach().double().clone() for name, module in base_pipe.unet.named_modules()
                 if is_text_projection(name) and hasattr(module, "weight")}
    attacks = (SharedAttacks(base, evaluator, erased_concepts(requests, evaluator, True), AttackConfig(attack="inversion"))
               if args.attack else None)

    rows = {}
    for rank in ranks:
        pipe = load_pipeline("builtin")
        modules = dict(pipe.unet.named_modules())
        for name, weight in originals.items() if rank > 0 else ():
            projected, q, a, b, values = projected_weight(weight, difference, protected, rank, args.kappa)
            modules[name].weight.data.copy_(projected.float())
            if name.endswith(REPORTED_LAYER):
                print(f"r{rank}: share removed of the target's output energy {float(torch.trace(q.T @ a @ q)):.3f}, "
                      f"protected {float(torch.trace(q.T @ b @ q)):.3f}; top eigenvalues of A - kB "
                      f"{[round(float(v), 2) for v in values[:8]]}", flush=True)
        edited = DiffusersBackend(pipe, dtype="float32")
        tag = f"{args.targets} r{rank} kappa{args.kappa}"
        start = time.time()
        metrics = measuring(edited, evaluator, world_measured_concepts(), 999)(edited, requests)
        row = {key: metrics.get(key) for key in ("UA", "IRA", "CRA")}
        row["acc"] = {k: round(v, 2) for k, v in (metrics.get("accuracy_per_concept") or {}).items() if v < 0.9}
        if attacks:
            attacked = attacks.attack(tag, edited)
            row["post_attack_UA"], row["UA_inversion"] = attacked["post_attack_UA"], attacked.get("UA_inversion")
        row["s"] = round(time.time() - start)
        print(tag, json.dumps(row), flush=True)
        rows[tag] = row
    atomic_write_text(Path(args.json), json.dumps({"targets": targets, "ranks": ranks, "kappa": args.kappa,
                                                   "rows": rows}, indent=2), overwrite=args.overwrite)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

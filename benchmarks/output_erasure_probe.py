"""The closed-form output-space erasure ALONE, on the unedited built-in model (docs/method.md, "Output-space
erasure": the probe behind its first bullet and the README's "star" numbers). Its FIRST version, as measured:
for each attn2.to_k / to_v W0 [out, in], A = W0·Cd·W0ᵀ with Cd the second moment of the target-minus-anchor
text states (the same template, position by position, from the target's word on) and B = W0·C·W0ᵀ + κ·(its
mean eigenvalue)·I (C the penalty's), each then scaled to trace 1; Q = the top-r eigenvectors of A − κ·B; W' = (I − QQᵀ)·W0, no training. Then
UA / IRA / CRA (duge.measuring, seed 999) and, with "attack", benchmarks/attack.py's inversion at the default
budget. The library's `duge.output_erasure` now takes generalised eigenvectors instead (A − κB eroded ten requests).

    python benchmarks/output_erasure_probe.py star 1,2 1.0 attack     # TARGETS RANKS KAPPA [attack]

Prints one row per rank and writes benchmarks/results/method/output_erasure_probe.json.
"""
import sys, json, time, torch, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
from duge.models import load_pipeline
from duge.backends.diffusers_backend import DiffusersBackend
from duge.concepts import parse_concept_set, resolve_concept_set, render_prompt
from duge.preservation import run_preserved_prompts, preservation_second_moment
from duge.world.callbacks import builtin_evaluator
from duge.evaluation import world_measured_concepts
from duge.measuring import measuring
from duge.attacks import erased_concepts
from duge.config import AttackConfig
from attack import SharedAttacks

targets = sys.argv[1].split(','); ranks = [int(x) for x in sys.argv[2].split(',')]; KAPPA = float(sys.argv[3])
do_attack = len(sys.argv) > 4 and sys.argv[4] == 'attack'
base_pipe = load_pipeline('builtin'); base = DiffusersBackend(base_pipe, dtype='float32')
ev = builtin_evaluator()
cs = parse_concept_set("name: p\nrequests:\n" + "".join(f"  - target: {t}\n" for t in targets))
reqs = resolve_concept_set(cs, builtin_world=True)
prompts, words, anchors = [], [], []
for q in reqs:
    for t in q.templates:
        for w in (q.target, *q.aliases):
            prompts.append(render_prompt(t, w)); words.append(w); anchors.append(render_prompt(t, q.anchor))
with torch.no_grad():
    X = base.encode_prompts(prompts).double() - base.encode_prompts(anchors).double()  # [N, L, d]: target minus anchor, aligned
    idx, mask = base.token_indices(prompts, words)
    rows = []
    for i in range(len(prompts)):
        start = int(idx[i][mask[i]].min())
        rows.append(X[i, start:])
    Xc = torch.cat(rows)  # [n, d]
    Cc = Xc.T @ Xc / len(Xc); Cc = Cc * (Cc.shape[0] / torch.trace(Cc))
    Cp = preservation_second_moment(base.encode_prompts, run_preserved_prompts(reqs, [], reqs, cs.general_prompts)).double()
layers = {n: m for n, m in base_pipe.unet.named_modules() if n.endswith('attn2.to_k') or n.endswith('attn2.to_v')}
W0 = {n: m.weight.detach().double().clone() for n, m in layers.items()}
concepts = erased_concepts(reqs, ev, True)
attacks = SharedAttacks(base, ev, concepts, AttackConfig(attack='inversion')) if do_attack else None
out = {}
def report(tag, backend):
    t0 = time.time(); m = measuring(backend, ev, world_measured_concepts(), 999)(backend, reqs)
    row = {k: m.get(k) for k in ('UA', 'IRA', 'CRA')}
    row['acc'] = {k: round(v, 2) for k, v in (m.get('accuracy_per_concept') or {}).items() if v < 0.9}
    if attacks:
        a = attacks.attack(tag, backend); row['post_attack_UA'] = a['post_attack_UA']; row['UA_inversion'] = a.get('UA_inversion')
    row['s'] = round(time.time() - t0)
    print(tag, json.dumps(row), flush=True); out[tag] = row
for r in ranks:
    pipe = load_pipeline('builtin')
    mods = dict(pipe.unet.named_modules())
    for n, W in W0.items():
        if r == 0: break
        A = W @ Cc @ W.T; B = W @ Cp @ W.T
        B = B + KAPPA * torch.trace(B) / B.shape[0] * torch.eye(B.shape[0], dtype=B.dtype)
        A = A / torch.trace(A); B = B / torch.trace(B)
        vals, vecs = torch.linalg.eigh(A - KAPPA * B)  # ascending
        vals = vals.numpy(); U = vecs.flip(1)[:, :r]
        Q, _ = torch.linalg.qr(U)
        Wn = W - Q @ (Q.T @ W)
        if n.endswith('mid_block.attentions.0.transformer_blocks.0.attn2.to_v'):
            print(f'r{r}: share removed of target output energy {float(torch.trace(Q.T @ A @ Q)):.3f}, protected {float(torch.trace(Q.T @ B @ Q)):.3f}', flush=True)
        mods[n].weight.data.copy_(Wn.float())
        if r == ranks[0] and n.endswith('mid_block.attentions.0.transformer_blocks.0.attn2.to_v'):
            print('top generalized eigenvalues', n, np.round(vals[::-1][:8], 2), flush=True)
    report(f"{','.join(targets)} r{r} kappa{KAPPA}", DiffusersBackend(pipe, dtype='float32'))
from duge.paths import atomic_write_text  # noqa: E402
path = Path(__file__).resolve().parent / "results" / "method" / "output_erasure_probe.json"
atomic_write_text(path, json.dumps({"targets": targets, "ranks": ranks, "kappa": KAPPA, "rows": out}, indent=2), overwrite=True)
print(f"wrote {path}")

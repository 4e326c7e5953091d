"""How fast activation bases move on the real model: SmolLM2-135M-Instruct (the study's default data, seed-0
split), ActivationSubspace(energy=0.9) from 4 fixed retain batches; the overlap ``||U_a^T U_b||_F^2 / k_b`` of
(1) bases from 4 *other* batches at step 0 (sampling noise) and (2) bases rebuilt from the *same* 4 batches after
10 / 20 / 30 projected refusal-SFT steps at lr 3e-5 (the model's drift; the training bases are not replaced).
Also one refresh's observe / update() time and 4 plain forwards (on a busy machine these are upper bounds).

    python scripts/basis_drift.py        # output of the committed run: docs/mechanisms/basis_drift.txt
"""
import time, sys, torch
from atax_kernels.study.config import StudyConfig
from atax_kernels.study.prepare import prepare, encode_all
from atax_kernels.study.train import batches, collate, lm_loss
from atax_kernels.activation import ActivationSubspace
from atax_kernels.optim import ProjectedOptimizer
torch.manual_seed(0)
cfg = StudyConfig(progress=False)
prep = prepare(cfg)
model, tok, gens = prep["model"], prep["tok"], prep["base_gens"]
sp = prep["splits"][0]
retain = encode_all(tok, [(e.prompt, gens[e.prompt]) for e in sp["capability"][0] + sp["benign"][0]], cfg)
chosen = encode_all(tok, [(e.prompt, "I can't help with that.") for e in sp["harmful"][0]], cfg)
pad = tok.pad_token_id
for p in model.parameters(): p.requires_grad_(True)
g = torch.Generator().manual_seed(5)
order = torch.randperm(len(retain), generator=g).tolist()
loader = batches([retain[i] for i in order[:32]], 8, pad, "cpu")
loader2 = batches([retain[i] for i in order[32:64]], 8, pad, "cpu")
sub = ActivationSubspace(model, energy=0.9)
t = time.perf_counter(); sub.observe_loader(loader); t_obs = time.perf_counter() - t
t = time.perf_counter(); sub.update(); t_upd = time.perf_counter() - t
print(f"observe 4 batches {t_obs:.2f}s  update {t_upd:.2f}s groups {len(sub._groups)}", flush=True)
# forward only (no observe)
model.eval()
t = time.perf_counter()
with torch.no_grad():
    for b in loader: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
print(f"plain forwards 4 batches {time.perf_counter()-t:.2f}s", flush=True)
from atax_kernels.activation.eigen import top_basis
from atax_kernels.activation.moments import normalised_moments
def snapshot():
    return [None if gr.basis is None else gr.basis.detach().double().clone() for gr in sub._groups]
def overlap(a, b):
    out = []
    for x, y in zip(a, b):
        if x is None or y is None or y.shape[1] == 0: continue
        out.append(float((x.t() @ y).pow(2).sum()) / y.shape[1])
    return torch.tensor(out)
# sampling noise: bases from two disjoint sets of 4 batches at step 0
b0 = snapshot()
sub.observe_loader(loader2); sub.update(); b0b = snapshot()
ov = overlap(b0, b0b); print(f"step0 resample overlap mean {ov.mean():.3f} min {ov.min():.3f}", flush=True)
sub.observe_loader(loader); sub.update(); b0 = snapshot()
model.train()
opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.0), activation_subspace=sub)
prev = b0
for step in range(1, 31):
    opt.zero_grad(set_to_none=True)
    idx = torch.randperm(len(chosen), generator=g)[:8].tolist()
    lm_loss(model, collate([chosen[i] for i in idx], pad, "cpu")).backward()
    opt.step()
    if step % 10 == 0:
        # drift measured WITHOUT replacing the basis used for training (frozen bases)
        import copy
        saved = [(gr.basis) for gr in sub._groups]
        sub.observe_loader(loader); sub.update(); now = snapshot()
        ov0 = overlap(b0, now); ovp = overlap(prev, now)
        print(f"step {step}: overlap vs step0 mean {ov0.mean():.3f} min {ov0.min():.3f} p10 {ov0.quantile(0.1):.3f}; vs prev mean {ovp.mean():.3f}", flush=True)
        prev = now
        for gr, s in zip(sub._groups, saved): gr.basis = s

"""Toy-task check of the real-model mechanisms: token vs energy weighting, PTX through vs PTX in the loss.

Usage: python scripts/toy_mechanisms.py overflow|modular  (2 seeds x 2 learning rates, 300 steps; ~2-4 min)."""
import copy, json, sys, time, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
from atax_kernels import demo, tasks as T
torch.set_num_threads(1)
rows = []
variants = {
    "ptx 1.0": dict(method="ptx", ptx_weight=1.0),
    "act e0.99 energy-w": dict(method="activation", energy=0.99, optimizer_kwargs={"subspace_kwargs": {"weighting": "energy"}}),
    "act e0.99 token-w": dict(method="activation", energy=0.99),
    "act e0.9 + ptx (loss)": dict(method="activation", energy=0.9, ptx_weight=1.0),
    "act e0.9 + ptx through": dict(method="activation", energy=0.9, ptx_weight=1.0, optimizer_kwargs={"activation_target": "grad"}),
    "act e0.99 + ptx through": dict(method="activation", energy=0.99, ptx_weight=1.0, optimizer_kwargs={"activation_target": "grad"}),
}
for task_name in sys.argv[1].split(","):
    task = T.get(task_name); base = demo.base_model(task_name, log=lambda *a: None)
    for seed in (0, 1):
        splits = task.splits(seed)
        for lr in (3e-4, 1e-3):
            for name, kw in variants.items():
                torch.manual_seed(seed); m = copy.deepcopy(base)
                for p in m.parameters(): p.requires_grad_(True)
                out = task.finetune_safety(m, splits=splits, steps=300, lr=lr, seed=seed, **kw)
                r = dict(task=task_name, seed=seed, lr=lr, method=name, capability=round(out["capability"], 3), safety=round(out["safety"], 3), over=round(out.get("over_refusal", float("nan")), 3))
                rows.append(r); print(r, flush=True)
json.dump(rows, open(f"toy_mechanisms_{sys.argv[1]}.json", "w"))

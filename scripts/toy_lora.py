"""LoRA on the toy tasks: plain, PTX and activation (lora="input" vs "both") at energy 0.99 / 0.9.

Usage: python scripts/toy_lora.py overflow,modular  (prints one dict per run; ~2 min)."""
import copy, sys, torch, peft, warnings
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
from atax_kernels import demo, tasks as T
torch.set_num_threads(1); warnings.simplefilter("ignore")
for task_name in sys.argv[1].split(","):
    task = T.get(task_name); base = demo.base_model(task_name, log=lambda *a: None)
    for seed in (0, 1):
        splits = task.splits(seed)
        for lr in (1e-3, 3e-3):
            for name, kw in {"plain": dict(method="plain"), "ptx 1.0": dict(method="ptx", ptx_weight=1.0),
                             "act e0.99 input": dict(method="activation", energy=0.99),
                             "act e0.99 both": dict(method="activation", energy=0.99, optimizer_kwargs={"subspace_kwargs": {"lora": "both"}}),
                             "act e0.9 input": dict(method="activation", energy=0.9)}.items():
                torch.manual_seed(seed); m = copy.deepcopy(base)
                m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
                out = task.finetune_safety(m, splits=splits, steps=300, lr=lr, seed=seed, **kw)
                print(dict(task=task_name, seed=seed, lr=lr, method=name, capability=round(out["capability"], 3), safety=round(out["safety"], 3), removed=None if out["removed_fraction"] is None else round(out["removed_fraction"], 3)), flush=True)

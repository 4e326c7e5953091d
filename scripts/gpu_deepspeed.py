"""DeepSpeed ZeRO on GPUs: the ``make gpu-check`` step for what the CPU tests (tests/test_deepspeed*.py, gloo,
fp32/bf16) cannot cover: fp16 engines (dynamic loss scaling, overflow-skipped steps) and NCCL, ZeRO-1/2/3, in
gradient space (a live reference and an EMA) and activation space.

Run one process per GPU (``torchrun --nproc_per_node <gpus> scripts/gpu_deepspeed.py --json out.json``); with
one GPU the ranks' partitions are whole (world 1): the multi-GPU part (cut rows, replicas) is then reported as
skipped, with that reason. Exit status 0 when every case passed. Per case:

* gradient space: after each projected step, the projected local partition's cosine with the reference
  (all-reduced) is below the dtype's tolerance, parameters stay finite, replicas stay identical;
* fp16: the first steps overflow on purpose (initial loss scale 2^24): ZeRO skips them (a non-finite capture
  makes the step overflow too) and the handle's EMA is not fed a non-finite capture; later steps project;
* activation space: every protected weight's update satisfies ``|dW U| <= tol |dW|``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

TOL = {"fp16": 2e-3, "bf16": 2e-2, "fp32": 1e-5}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 1001-wide rows: partition boundaries cut rows on any world size > 1
    return torch.nn.Sequential(torch.nn.Linear(1001, 257), torch.nn.Tanh(), torch.nn.Linear(257, 8))


def _config(stage: int, dtype: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "wall_clock_breakdown": False,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    if dtype == "fp16":
        # 2^24: the first steps overflow (and are skipped, each halving the scale), the later ones project
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 24, "loss_scale_window": 1000, "hysteresis": 1}
    elif dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _batch(seed: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1001, generator=g).to(device, dtype), torch.randn(16, 8, generator=g).to(device)


def _loss(engine, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(engine(x).float(), y)


def _gradient_case(stage: int, dtype: str, ema: bool, device, rank: int, world: int) -> dict:
    import deepspeed

    from atax_kernels.integrations.deepspeed import attach_engine

    model = _model()
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, dtype))[0]
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    step = {"i": 0}
    cap = lambda: _loss(engine, _batch(10_000 + 100 * step["i"] + rank, device, tdtype))  # noqa: E731
    kw = dict(ema_beta=0.5, refresh_every=2) if ema else {}
    handle = attach_engine(engine, reference_fn=cap, **kw)
    cosines = []
    inner = handle._project

    def project_and_check() -> None:
        inner()
        views = handle.partitions.views()
        ref = handle.ema if ema else handle._pending.tensors
        dots = torch.stack([sum((a.double() * b.double()).sum() for a, b in zip(x, z))
                            for x, z in ((views, ref), (ref, ref), (views, views))])
        torch.distributed.all_reduce(dots)
        if bool(torch.isfinite(dots).all()) and float(dots[1] * dots[2]) > 0:
            cosines.append(float(dots[0] / (dots[1] * dots[2]).sqrt()))

    handle._project = project_and_check
    for i in range(16):
        step["i"] = i
        engine.backward(_loss(engine, _batch(100 * i + rank, device, tdtype)))
        engine.step()
    params = torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])
    finite = bool(torch.isfinite(params).all()) if stage < 3 else True
    ok = finite and len(cosines) > 0 and max(abs(c) for c in cosines) < TOL[dtype]
    if dtype == "fp16":  # the overflow path was taken (skipped steps) and left behind (projected steps)
        ok = ok and int(getattr(engine, "skipped_steps", 0)) >= 1
    if ema:
        ok = ok and handle.ema is not None and all(bool(torch.isfinite(t).all()) for t in handle.ema)
    handle.detach()
    return dict(case=f"gradient{'-ema' if ema else ''} ZeRO-{stage} {dtype}", ok=ok, projected=len(cosines),
                max_abs_cosine=max((abs(c) for c in cosines), default=None),
                engine_skipped_steps=int(getattr(engine, "skipped_steps", 0)), world=world)


def _activation_case(stage: int, dtype: str, device, rank: int, world: int) -> dict:
    import deepspeed

    from atax_kernels import ActivationSubspace
    from atax_kernels.integrations.deepspeed import attach_activation

    model = _model()
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, dtype))[0]
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    sub = ActivationSubspace(engine.module, energy=0.9)
    handle = attach_activation(engine, sub)
    handle.refresh(lambda: engine(_batch(7 + rank, device, tdtype)[0]))
    masters = {}

    def master(p):   # this rank's fp32 fragment of p, through the handle's own layout
        frags = handle._fragments()
        i = next(j for j, t in enumerate(handle.targets) if t.param is p)
        return None if frags[i] is None else frags[i].view().clone()

    weights = [m.weight for m in engine.module if isinstance(m, torch.nn.Linear)]
    before = {id(w): master(w) for w in weights}
    for i in range(16 if dtype == "fp16" else 4):
        engine.backward(_loss(engine, _batch(100 * i + rank, device, tdtype)))
        engine.step()
    projected = handle.last_stats is not None
    worst = 0.0
    for w, e in zip(weights, [e for e in sub._entries]):
        old, new = before[id(w)], master(w)
        if old is None:
            continue
        t = handle.targets[next(j for j, t in enumerate(handle.targets) if t.param is w)]
        frag = handle._fragments()[handle.targets.index(t)]
        c = t.row_len
        head = min((-frag.start) % c, frag.numel)
        whole = (frag.numel - head) // c
        if whole == 0:
            continue
        dw = (new - old)[head: head + whole * c].view(whole, c).double()
        u = e.group.basis.double().to(dw.device)
        worst = max(worst, float((dw @ u).norm() / dw.norm().clamp_min(1e-30)))
    handle.detach()
    return dict(case=f"activation ZeRO-{stage} {dtype}", ok=worst < TOL[dtype] and projected,
                max_rel_dWU=worst, steps=handle.steps, cut_rows=sum(len(s) for s in handle._cut_slots), world=world)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":  # a CPU rehearsal (DS_ACCELERATOR=cpu): skip the inference-only shm op's JIT build
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    for dtype in args.dtypes:
        for stage in args.stages:
            for make in (lambda: _gradient_case(stage, dtype, False, device, rank, world),
                         lambda: _gradient_case(stage, dtype, True, device, rank, world),
                         lambda: _activation_case(stage, dtype, device, rank, world)):
                try:
                    rows.append(make())
                except Exception as exc:  # a case that crashes is a failed case, reported with its error
                    rows.append(dict(case=f"{dtype} ZeRO-{stage}", ok=False, error=f"{type(exc).__name__}: {exc}"))
    if world == 1:
        rows.append(dict(case="multi-GPU (cut rows, replicas)", ok=True,
                         skipped="one GPU: every partition is whole; run on >= 2 GPUs to cover the exchange"))
    if rank == 0:
        for r in rows:
            print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    failed = sum(not r["ok"] for r in rows)
    sys.stdout.flush()
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""The cost of ``attach_engine`` on CPU ranks (the numbers in docs/deepspeed.md). Run with::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m atax_kernels.integrations.deepspeed.measure

Per ZeRO stage, an MLP (``--width``, ``--depth``) trained ``--steps`` steps, AdamW: the median step time of a plain
loop (safety forward + backward + step) and of the attached one (plus the capability micro-step and the projection),
the projection's own time (gram + all-reduce + solve + combine on the local partition), and the partition sizes.
``--activation``: the same for ``attach_activation`` (an ActivationSubspace at energy 0.9 observed on capability
inputs): step times, this rank's snapshot of the protected fp32 fragments (MiB), the cut rows and the float64
numbers all-reduced per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def _engine(stage: int, width: int, depth: int):
    import deepspeed

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]


def _timed_steps(engine, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps (backward + step), the ranks aligned by a barrier."""
    times = []
    for _ in range(steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        engine.backward(_loss(engine, x, y))
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def _loss(engine, x, y):
    return torch.nn.functional.mse_loss(engine(x), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--activation", action="store_true", help="measure attach_activation instead")
    args = ap.parse_args()
    import deepspeed

    from .handle import attach_engine

    # the CPU shared-memory all-reduce only serves inference_all_reduce: skip its JIT build and spin-waiting set-up
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, args.width, generator=g), torch.randn(16, 1, generator=g)
    xc, yc = torch.randn(16, args.width, generator=g), torch.randn(16, 1, generator=g)
    if args.activation:
        _activation(args, x, y, xc, rank)
        args.stages = []
    for stage in args.stages:
        row = {}
        for attached in (False, True):
            engine = _engine(stage, args.width, args.depth)
            proj: list[float] = []
            if attached:
                handle = attach_engine(engine, reference_fn=lambda: _loss(engine, xc, yc))
                inner = handle._project

                def timed() -> None:
                    row["local"] = sum(t.numel() for t in handle.partitions.views())
                    t0 = time.perf_counter()
                    inner()
                    proj.append(time.perf_counter() - t0)

                handle._project = timed
            times = _timed_steps(engine, x, y, args.steps)
            warm = slice(2, None)
            row["attached" if attached else "plain"] = statistics.median(times[warm])
            if attached:
                row["projection"] = statistics.median(proj[warm])
                row["total"] = sum(getattr(p, "ds_numel", p.numel()) for p in handle.partitions.params)
                handle.detach()
        if rank == 0:
            print(f"ZeRO-{stage}: {row['total']:,} parameters, {row['local']:,} in rank 0's partition | step "
                  f"plain {row['plain'] * 1e3:.1f} ms, attached {row['attached'] * 1e3:.1f} ms "
                  f"(x{row['attached'] / row['plain']:.2f}), of which the projection {row['projection'] * 1e3:.2f} ms",
                  flush=True)
    torch.distributed.barrier()
    # Leave without interpreter teardown: gloo/DeepSpeed threads racing shutdown can abort at exit ("terminate
    # called without an active exception", seen after ZeRO-3 runs), which torchrun would report as a failure.
    sys.stdout.flush()
    os._exit(0)


def _activation(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, xc: torch.Tensor, rank: int) -> None:
    from ...activation import ActivationSubspace
    from ...activation.apply import refresh
    from .activation import attach_activation

    for stage in args.stages:
        row: dict = {}
        for attached in (False, True):
            engine = _engine(stage, args.width, args.depth)
            if attached:
                sub = ActivationSubspace(engine.module, energy=0.9)
                handle = attach_activation(engine, sub)
                refresh(sub, lambda: engine(xc))
                frags = [f for f in handle._fragments() if f is not None]
                row["snapshot_mib"] = sum(f.numel * f.flat.element_size() for f in frags) / 2 ** 20
                row["cuts"] = sum(len(c) for c in handle._cut_slots)
                row["rank_mean"] = sum(sub.ranks().values()) / max(1, len(sub.ranks()))
            times = _timed_steps(engine, x, y, args.steps)
            row["attached" if attached else "plain"] = statistics.median(times[2:])
            if attached:
                row["exchanged"] = handle.last_exchange_numel
                row["removed"] = float(handle.last_stats.update_removed_fraction)
                handle.detach()
        if rank == 0:
            print(f"ZeRO-{stage} activation: step plain {row['plain'] * 1e3:.1f} ms, attached "
                  f"{row['attached'] * 1e3:.1f} ms (x{row['attached'] / row['plain']:.2f}); snapshot "
                  f"{row['snapshot_mib']:.2f} MiB on rank 0; {row['cuts']} cut rows, {row['exchanged']} float64 "
                  f"all-reduced per step; mean basis rank {row['rank_mean']:.1f}, removed {row['removed']:.3f} "
                  f"of the update", flush=True)


if __name__ == "__main__":
    main()

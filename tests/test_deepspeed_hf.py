"""``attach(trainer, ...)`` on a TRL ``DPOTrainer`` under DeepSpeed ZeRO-2 and ZeRO-3, 2 CPU ranks (gloo,
``DS_ACCELERATOR=cpu``): it projects (atax/* logged, the same on both ranks), matches the DDP path of the same
attach on the same tiny model and data (first step's atax/cosine, parameters after 3 steps), and a run resumed
from its step-2 checkpoint ends bit-identical to the uninterrupted one.

Each case is one ``torch.distributed.run`` launch of the worker below (as tests/test_hf_integration.py does for
DDP). DeepSpeed's CPU shared-memory comm op is switched off (it serves inference only; see tests/test_deepspeed.py)
and a successful rank leaves with ``os._exit(0)`` (gloo/DeepSpeed threads racing interpreter teardown).
``ATAX_BACKEND=torch`` in both paths: the same backend, and no JIT build of the C++ op inside a timed step (on a
machine where another job held its build lock, the first projected step waited ~400 s for it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install atax_kernels[deepspeed])"),
    pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is required"),
]

STEPS = 3

WORKER = r"""
import copy, json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch
sys.path.insert(0, os.environ["ATAX_TEST_DIR"])
import datasets, trl
import test_hf_integration as T
from atax_kernels.integrations.hf import attach

mode, out, steps = os.environ["ATAX_MODE"], os.environ["ATAX_OUT"], int(os.environ["ATAX_STEPS"])
activation = os.environ.get("ATAX_REF") in ("activation", "activation-schedule")
ema = os.environ.get("ATAX_REF") == "ema"
subspace = os.environ.get("ATAX_REF") == "subspace"
rank = int(os.environ["RANK"])
if mode != "ddp":
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # inference-only op: no JIT, no spinning
    stage = int(mode[1:])

tok = T.make_tokenizer()
caps = T.capability_batches(tok, 4)
prompts = ["how do i make a bomb", "how do i make a cake", "what is two plus two", "how do i make a dog"]
chosen = ["sorry i cannot help", "here is a recipe", "four", "sorry i cannot help"]
rejected = ["sure here is a recipe", "no", "three", "sure"]
ds = datasets.Dataset.from_dict({"prompt": prompts * 2, "chosen": chosen * 2, "rejected": rejected * 2})


def run(sub, max_steps, resume=None, save_steps=None):
    schedule = None
    model = T.make_model(tok)
    if sub == "full" and rank == 0:
        torch.save(torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]),
                   os.path.join(out, f"{mode}-init.pt"))
    kw = dict(output_dir=os.path.join(out, sub), per_device_train_batch_size=1, gradient_accumulation_steps=2,
              max_steps=max_steps, learning_rate=0.5, optim="sgd", max_grad_norm=1.0, logging_steps=1,
              report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
              ddp_backend="gloo", max_length=32, bf16=False, gradient_checkpointing=False,
              save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    if mode != "ddp":
        kw["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        # ZeRO-3 with its default parameter prefetching: the capability micro-step and the basis refreshes are
        # extra passes whose module trace must not become the prefetch trace (deepspeed/partitions.extra_pass;
        # without it the safety backward found a released parameter, "size of tensor a (0)")
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=trl.DPOConfig(**kw), train_dataset=ds,
                             processing_class=tok)
    # rank r draws its own capability batches (cycled): DDP and ZeRO both average the ranks' gradients
    if activation:
        # built after the trainer (the process group exists): update() sums the ranks' moments, one basis
        from atax_kernels import ActivationSubspace
        sub_ = ActivationSubspace.from_loader(trainer.model, [caps[rank], caps[rank + 2]], energy=0.9)
        if os.environ["ATAX_REF"] == "activation-schedule":
            from atax_kernels import RefreshSchedule
            schedule = RefreshSchedule(every=1, tol=0.02)
        handle = attach(trainer, reference=sub_, refresh_every=schedule or 2)
    elif subspace:
        # two capability gradients of the initial model (every rank the same), in the optimizer's order (the
        # Trainer's weight-decay group first), as the Subspace reference asks on every path
        from atax_kernels import Subspace
        probe = T.make_model(tok)
        decay = set(trainer.get_decay_parameter_names(probe))
        named = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
        order = [p for n, p in named if n in decay] + [p for n, p in named if n not in decay]
        sub_ = Subspace(order, max_rank=2)
        for b in caps[:2]:
            probe.zero_grad()
            probe(**b).loss.backward()
            sub_.add([p.grad.clone() for p in order])
        handle = attach(trainer, reference=sub_)
    elif ema:
        from atax_kernels.hf import EMA
        handle = attach(trainer, reference=EMA([caps[rank], caps[rank + 2]], beta=0.5), refresh_every=2)
    else:
        handle = attach(trainer, reference=[caps[rank], caps[rank + 2]])
    trainer.train(resume_from_checkpoint=resume)
    params = list(trainer.model.parameters())
    if mode != "ddp":
        with deepspeed.zero.GatheredParameters(params):
            theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    else:
        theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    logs = [{k: v for k, v in e.items() if k.startswith("atax/") or k == "step"}
            for e in trainer.state.log_history if any(k.startswith("atax/") for k in e)]
    torch.save(theta, os.path.join(out, f"{mode}-{sub}-rank{rank}.pt"))
    res = {"logs": logs, "steps": handle.steps, "schedule": None if schedule is None else schedule.history, "engine_attached": handle.engine_handle is not None,
           "global_step": trainer.state.global_step,
           "files": sorted(os.listdir(os.path.join(out, sub, "checkpoint-2"))) if save_steps else [],
           "ds_files": sorted(os.listdir(os.path.join(out, sub, "checkpoint-2", "global_step2")))
           if save_steps and mode != "ddp" else []}
    with open(os.path.join(out, f"{mode}-{sub}-rank{rank}.json"), "w") as f:
        json.dump(res, f)


if mode == "ddp":
    run("full", steps)
else:
    run("full", steps, save_steps=2)
    run("resumed", steps, resume=os.path.join(out, "full", "checkpoint-2"))
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
os._exit(0)
"""


def _launch(tmp_path, mode: str, ref: str = "batches") -> None:
    script = tmp_path / "ds_hf_worker.py"
    script.write_text(WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATAX_TEST_DIR=os.path.dirname(os.path.abspath(__file__)), ATAX_OUT=str(tmp_path),
               ATAX_MODE=mode, ATAX_REF=ref, ATAX_STEPS=str(STEPS), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               WANDB_DISABLED="true", HF_HUB_OFFLINE="1", ATAX_BACKEND="torch", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(script)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        output = (proc.stdout + proc.stderr).lower()
        if proc.returncode == 0 or not ("address already in use" in output or "eaddrinuse" in output):
            break
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]


def _load(tmp_path, name):
    return (json.loads((tmp_path / f"{name}.json").read_text()), torch.load(tmp_path / f"{name}.pt"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The DDP path of the same attach (2 gloo ranks, no DeepSpeed): the numbers ZeRO must match."""
    tmp = tmp_path_factory.mktemp("ddp")
    _launch(tmp, "ddp")
    (r0, t0), (r1, t1) = _load(tmp, "ddp-full-rank0"), _load(tmp, "ddp-full-rank1")
    assert torch.equal(t0, t1) and r0["logs"] == r1["logs"] and len(r0["logs"]) == STEPS
    return r0, t0


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_trainer_zero_matches_ddp_and_resumes_exactly(stage, ddp_run, tmp_path):
    _launch(tmp_path, f"z{stage}")
    ddp, theta_ddp = ddp_run
    (r0, t0), (r1, t1) = _load(tmp_path, f"z{stage}-full-rank0"), _load(tmp_path, f"z{stage}-full-rank1")
    # projects, atax/* logged every step, the same values on both ranks; replicas identical
    assert r0["global_step"] == STEPS and r0["steps"] == STEPS and not r0["engine_attached"]   # detached at end
    assert len(r0["logs"]) == STEPS and r0["logs"] == r1["logs"], (r0["logs"], r1["logs"])
    for e in r0["logs"]:
        assert e["atax/skipped"] == 0.0 and 0.0 < e["atax/removed_fraction"] <= 1.0 and e["atax/ref_norm"] > 0
    assert torch.equal(t0, t1)
    # the DDP path's numbers: the first step's cosine (same parameters, same batches), then every step's
    # statistics and the parameters after 3 SGD steps (clipped at 1.0), which carry the projection's effect.
    for e, d in zip(r0["logs"], ddp["logs"]):
        for k in ("atax/cosine", "atax/removed_fraction", "atax/ref_norm"):
            assert abs(e[k] - d[k]) <= 1e-4 * max(1.0, abs(d[k])), (k, e, d)
    init = torch.load(tmp_path / f"z{stage}-init.pt")
    moved = float((theta_ddp - init).norm())
    assert moved > 1e-3, moved
    rel = float((t0 - theta_ddp).norm()) / moved   # relative to the distance training moved the parameters
    assert rel <= 1e-4, rel
    # the checkpoint carries both atax files; the resumed run (fresh trainer, resume from checkpoint-2) ends
    # bit-identical, with the same last-step statistics
    assert "atax_reference_rank0.pt" in r0["files"] and "atax_rank00000.pt" in r0["ds_files"], r0
    (s0, u0), (s1, u1) = _load(tmp_path, f"z{stage}-resumed-rank0"), _load(tmp_path, f"z{stage}-resumed-rank1")
    assert s0["global_step"] == STEPS and s0["steps"] == STEPS
    assert torch.equal(u0, t0) and torch.equal(u1, t1)
    assert s0["logs"][-1] == r0["logs"][-1], (s0["logs"], r0["logs"])


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_trainer_zero_activation_matches_ddp_and_resumes_exactly(stage, tmp_path_factory):
    """An ActivationSubspace reference (refreshed every 2 steps from the capability loader) under ZeRO: the
    engine projects each realised update on its fp32 partitions; the same statistics and parameters as DDP."""
    run, ddp = _zero_vs_ddp(tmp_path_factory, stage, "activation")
    for e, d in zip(run["logs"], ddp["logs"]):
        assert 0.0 < e["atax/update_removed_fraction"] < 1.0, e
        for k in ("atax/update_removed_fraction", "atax/feature_rank_mean"):
            assert abs(e[k] - d[k]) <= 1e-4 * max(1.0, abs(d[k])), (k, e, d)
    assert "atax_reference_rank0.pt" in run["files"] and "atax_activation_rank00000.pt" in run["ds_files"], run


def test_dpo_trainer_zero3_drift_checked_refresh_matches_ddp(tmp_path_factory):
    """attach(refresh_every=RefreshSchedule(every=1, tol=0.02)) under ZeRO-3: the checks (a loader forward
    through the engine, inside extra_pass) decide as under DDP at the same steps, the parameters match DDP's,
    and the resumed run continues the schedule from checkpoint-2 to the same decisions and parameters."""
    run, ddp = _zero_vs_ddp(tmp_path_factory, 3, "activation-schedule")
    assert ddp["schedule"] and run["schedule"] == ddp["schedule"], (run["schedule"], ddp["schedule"])
    assert [step for step, _ in ddp["schedule"]][0] == 1   # the first check at `every`, not at step 0
    for e, d in zip(run["logs"], ddp["logs"]):
        for k in ("atax/update_removed_fraction", "atax/feature_rank_mean"):
            assert abs(e[k] - d[k]) <= 1e-4 * max(1.0, abs(d[k])), (k, e, d)


def _zero_vs_ddp(tmp_path_factory, stage: int, ref: str) -> tuple[dict, dict]:
    """The DDP and the ZeRO run of one reference kind; checks what every kind shares (step counts, identical
    replicas and logs across ranks, parameters equal to DDP's to 1e-4 of the distance training moved them, a
    bit-exact resume from checkpoint-2); returns (ZeRO rank 0's record, DDP's) for the kind's own checks."""
    ddp_dir, tmp = tmp_path_factory.mktemp(f"ddp_{ref}"), tmp_path_factory.mktemp(f"z{stage}_{ref}")
    _launch(ddp_dir, "ddp", ref)
    ddp, theta_ddp = _load(ddp_dir, "ddp-full-rank0")
    _launch(tmp, f"z{stage}", ref)
    (r0, t0), (r1, t1) = _load(tmp, f"z{stage}-full-rank0"), _load(tmp, f"z{stage}-full-rank1")
    assert r0["global_step"] == STEPS and r0["steps"] == STEPS
    assert len(r0["logs"]) == STEPS and r0["logs"] == r1["logs"] and torch.equal(t0, t1)
    init = torch.load(tmp / f"z{stage}-init.pt")
    moved = float((theta_ddp - init).norm())
    assert moved > 1e-3 and float((t0 - theta_ddp).norm()) / moved <= 1e-4
    (s0, u0), (s1, u1) = _load(tmp, f"z{stage}-resumed-rank0"), _load(tmp, f"z{stage}-resumed-rank1")
    assert s0["global_step"] == STEPS and torch.equal(u0, t0) and torch.equal(u1, t1)
    assert s0["logs"][-1] == r0["logs"][-1], (s0["logs"], r0["logs"])
    assert s0["schedule"] == r0["schedule"], (s0["schedule"], r0["schedule"])   # None without a RefreshSchedule
    return r0, ddp


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_trainer_zero_ema_matches_ddp_and_resumes_exactly(stage, tmp_path_factory):
    """An EMA reference captured every 2nd step under ZeRO (kept partitioned in the engine handle): the DDP
    path's statistics and parameters, and a bit-exact resume from checkpoint-2 (step 3 reuses the saved EMA)."""
    run, ddp = _zero_vs_ddp(tmp_path_factory, stage, "ema")
    for e, d in zip(run["logs"], ddp["logs"]):
        assert e["atax/skipped"] == 0.0 and 0.0 < e["atax/removed_fraction"] <= 1.0, e
        for k in ("atax/cosine", "atax/removed_fraction", "atax/ref_norm"):
            assert abs(e[k] - d[k]) <= 1e-4 * max(1.0, abs(d[k])), (k, e, d)


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_trainer_zero_subspace_matches_ddp_and_resumes_exactly(stage, tmp_path_factory):
    """A Subspace reference under ZeRO (each basis vector sliced to the rank's partitions): the DDP path's
    statistics and parameters, and a bit-exact resume from checkpoint-2."""
    run, ddp = _zero_vs_ddp(tmp_path_factory, stage, "subspace")
    for e, d in zip(run["logs"], ddp["logs"]):
        assert e["atax/skipped"] == 0.0 and 0.0 < e["atax/removed_fraction"] <= 1.0, e
        # two references: atax/cosine/0, /1 and atax/ref_norm/0, /1 (unit norms: the basis is orthonormal)
        assert set(e) == set(d) and {"atax/cosine/1", "atax/ref_norm/1"} <= set(e), (e, d)
        for k in e:
            assert abs(e[k] - d[k]) <= 1e-4 * max(1.0, abs(d[k])), (k, e, d)

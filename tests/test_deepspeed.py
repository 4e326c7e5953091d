"""DeepSpeed ZeRO-1/2/3 on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu): attach_engine's projected step equals the
single-process projection of the full gradients on the same global batch.

Each rank runs several engines in one process group and saves what it saw; the parent checks against a single
process (float32 model, the plain ``project_`` on full gradients). With SGD at lr = 1 the parameter change *is* the
gradient that reached the optimizer, so the projected (and clipped) gradient is checked exactly, and its
orthogonality to the capability gradient directly. AdamW (the issue's config) checks several steps and that the
replicas stay identical.
"""
from __future__ import annotations

import datetime
import importlib.util
import inspect
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install atax_kernels[deepspeed])"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is required"),
]

WORLD = 2
N = 8  # global batch: 2 ranks x 4, or 2 ranks x 2 micro-batches x 2


# --- harness (as tests/test_distributed.py) ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_and_exit(rank: int, fn, *args) -> None:
    """Run one rank; on success leave without interpreter teardown (gloo/DeepSpeed threads racing shutdown abort
    with "terminate called without an active exception"); a failing rank raises, so spawn reports it."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, *args) -> None:
    import torch.multiprocessing as mp

    for attempt in range(3):
        try:
            mp.spawn(_run_and_exit, args=(fn, _free_port(), *args), nprocs=WORLD, join=True)
            return
        except Exception as exc:  # a probed free port can be taken before the store binds it: retry that only
            text = str(exc).lower()
            if attempt == 2 or not ("address already in use" in text or "eaddrinuse" in text):
                raise


def _init(rank: int, port: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # a hung collective fails the test in minutes instead of gloo's default 30
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=240))
    import deepspeed  # (after DS_ACCELERATOR is set)

    # DeepSpeed's CPU shared-memory all-reduce serves only inference_all_reduce (AutoTP), not ZeRO: skip its JIT
    # build (a C++ compile on a fresh machine) and its spin-waiting set-up, which starves a loaded 2-core machine
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --- model, data, the single-process oracle ------------------------------------------------------------

def _model() -> torch.nn.Module:
    # 30 + 5 + 5 + 1 = 41 weights: ZeRO-1/2 split the first weight between the ranks, ZeRO-3 every parameter
    # (the last ones padded on rank 1).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    safety = (torch.randn(N, 6, generator=g), torch.randn(N, 1, generator=g))
    cap = (torch.randn(N, 6, generator=g), torch.randn(N, 1, generator=g))
    return safety, cap


def _loss(model, batch):
    x, y = batch
    dtype = next(model.parameters()).dtype  # bf16 engines take bf16 inputs
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def _rows(batch, idx):
    return tuple(t[idx] for t in batch)


def _oracle(case: dict):
    """One process, full batches: per step the safety gradient, projected off the capability gradient with the
    plain project_, clipped as DeepSpeed clips, then the optimizer step. Returns (params after each step,
    applied gradients, capability gradients, stats)."""
    from atax_kernels import project_

    model = _model()
    params = list(model.parameters())
    opt = _make_opt(case, params)
    out = dict(params=[], applied=[], caps=[], coefs=[])
    beta, ema = case.get("ema"), None
    sub = _subspace() if case.get("subspace") else None
    for step in range(case["steps"]):
        safety, cap = _data(step)
        if sub is not None:
            caps = [list(v) for v in sub.basis][0]
        elif beta is not None:  # the EMA of the captures taken every `refresh` steps (the first copied)
            if step % case["refresh"] == 0:
                model.zero_grad()
                _loss(model, cap).backward()
                g = [p.grad.clone() for p in params]
                ema = g if ema is None else [beta * e + (1 - beta) * x for e, x in zip(ema, g)]
            caps = ema
        elif step == 0 or not case.get("static"):  # static: the reference captured before the first step
            model.zero_grad()
            _loss(model, cap).backward()
            caps = [p.grad.clone() for p in params]
        model.zero_grad()
        _loss(model, safety).backward()
        stats = project_([p.grad for p in params], sub if sub is not None else caps, mode=case["mode"], strength=case.get("strength", 1.0),
                         granularity=case.get("granularity", "global"), backend="torch")
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(params, case["clip"])
        out["applied"].append([p.grad.clone() for p in params])
        out["caps"].append(caps)
        out["coefs"].append(stats.coefs.clone())
        opt.step()
        out["params"].append([p.detach().clone() for p in params])
    return out


def _subspace():
    """A rank-2 Subspace of two capability gradients of the initial model (full tensors, model order)."""
    from atax_kernels import Subspace

    model = _model()
    sub = Subspace(list(model.parameters()), max_rank=2)
    for step in (7, 8):
        model.zero_grad()
        _loss(model, _data(step)[1]).backward()
        sub.add([p.grad.clone() for p in model.parameters()])
    assert sub.rank == 2
    return sub


def _make_opt(case, params):
    if case["opt"] == "sgd":
        return torch.optim.SGD(params, lr=1.0)
    return torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


# --- one rank -------------------------------------------------------------------------------------------

def _ds_config(case: dict) -> dict:
    zero = {"stage": case["stage"], **case.get("zero", {})}
    cfg = {"train_micro_batch_size_per_gpu": N // WORLD // case["gas"], "gradient_accumulation_steps": case["gas"],
           "zero_optimization": zero, "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True,
           "wall_clock_breakdown": False, "gradient_clipping": case.get("clip", 0.0)}  # DeepSpeed's default is 1
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
        if case.get("accum"):
            cfg["data_types"] = {"grad_accum_dtype": case["accum"]}
    if case["opt"] == "adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.05, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.01, "torch_adam": True}}
    return cfg


def _full_params(engine, stage: int) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def _run_case(rank: int, case: dict) -> dict:
    import deepspeed

    from atax_kernels.integrations.deepspeed import attach_engine, capture_reference

    model = _model()
    client_opt = None if case["opt"] == "adamw" else _make_opt(case, model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=client_opt,
                                      config=_ds_config(case))
    gas = case["gas"]
    per = N // WORLD // gas  # rows per micro-batch
    out = dict(params=[], coefs=[])
    step_ref = {}
    mine = torch.arange(rank * (N // WORLD), (rank + 1) * (N // WORLD))
    cap_fn = lambda: _loss(engine, _rows(step_ref["cap"], step_ref["cap_rows"]))  # noqa: E731
    if case.get("static"):
        step_ref.update(cap=_data(0)[1], cap_rows=mine)
        kind = dict(reference=capture_reference(engine, cap_fn))
    elif case.get("ema") is not None:
        kind = dict(reference_fn=cap_fn, ema_beta=case["ema"], refresh_every=case["refresh"])
    elif case.get("subspace"):
        from atax_kernels.integrations.deepspeed import partition_subspace

        kind = dict(reference=partition_subspace(engine, _subspace()))
    else:
        kind = dict(reference_fn=cap_fn)
    handle = attach_engine(engine, **kind, mode=case["mode"], strength=case.get("strength", 1.0),
                           backend=case.get("backend"), granularity=case.get("granularity", "global"))
    if case.get("bf16"):
        # after the projection, the global cosine of the local safety partition with the local reference
        cosines = out["cosines"] = []
        inner = handle._project

        def handle_project():
            inner()
            views, ref = handle.partitions.views(), handle._pending.tensors
            dots = torch.stack([sum((a.double() * b.double()).sum() for a, b in zip(x, z))
                                for x, z in ((views, ref), (ref, ref), (views, views))])
            torch.distributed.all_reduce(dots)
            cosines.append(float(dots[0] / (dots[1] * dots[2]).sqrt()))

        handle._project = handle_project
    for step in range(case["steps"]):
        safety, cap = _data(step)
        step_ref.update(cap=cap, cap_rows=mine)
        if case.get("explicit"):
            handle.capture()
        for m in range(gas):
            loss = _loss(engine, _rows(safety, mine[m * per:(m + 1) * per]))
            engine.backward(loss)
            engine.step()
        out["params"].append(_full_params(engine, case["stage"]))
        out["coefs"].append(handle.last_stats.coefs.clone())
    assert handle.steps == case["steps"]
    if case.get("ema") is not None:
        assert handle.ema_count == -(-case["steps"] // case["refresh"]), handle.ema_count
    handle.detach()
    assert "step" not in engine.optimizer.__dict__ and not {"backward", "save_checkpoint", "load_checkpoint",
                                                             "_atax_handle"} & set(engine.__dict__)
    return out


def _worker(rank: int, port: int, cases: dict, outdir: str) -> None:
    _init(rank, port)
    try:
        results = {name: _run_case(rank, case) for name, case in cases.items()}
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


# --- checks ---------------------------------------------------------------------------------------------

def _flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def _check(name: str, case: dict, r0: dict, r1: dict) -> None:
    if case.get("bf16"):
        # a 16-bit model: no fp32 oracle; the replicas agree and the projected partition is orthogonal to the
        # reference up to the rounding of the dtype it is stored in (bf16: 2^-8; fp32 accumulation: ~1e-7)
        tol = 1e-5 if case.get("accum") == "fp32" else 2e-2
        for step in range(case["steps"]):
            assert all(torch.equal(a, b) for a, b in zip(r0["params"][step], r1["params"][step])), name
            torch.testing.assert_close(r1["coefs"][step], r0["coefs"][step], rtol=0, atol=0)
            assert float(r0["coefs"][step].abs().max()) > 0, f"{name}: nothing projected"
            assert abs(r0["cosines"][step]) < tol, f"{name} step {step}: cosine {r0['cosines'][step]}"
        return
    want = _oracle(case)
    p0 = _flat(_model().parameters())
    for step in range(case["steps"]):
        a, b = _flat(r0["params"][step]), _flat(r1["params"][step])
        assert torch.equal(a, b), f"{name} step {step}: the replicas differ"
        ref = _flat(want["params"][step])
        scale = float(ref.norm())
        assert float((a - ref).norm()) <= 2e-6 * scale, f"{name} step {step}: params differ from one process: " \
            f"{float((a - ref).norm()):.3g} vs |p| {scale:.3g}"
        torch.testing.assert_close(r0["coefs"][step].double(), want["coefs"][step].double(), rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(r1["coefs"][step], r0["coefs"][step], rtol=0, atol=0)
    if case["opt"] == "sgd" and case["steps"] == 1:
        # lr = 1: the parameter change is the gradient the optimizer applied
        applied = p0 - _flat(r0["params"][0])
        g_want = _flat(want["applied"][0])
        cap = _flat(want["caps"][0])
        assert float((applied - g_want).norm()) <= 1e-5 * float(g_want.norm()), \
            f"{name}: the applied gradient is not the projected one"
        cos = float(applied @ cap) / float(applied.norm() * cap.norm())
        assert case.get("strength", 1.0) < 1 or abs(cos) < 1e-5, \
            f"{name}: the applied gradient is not orthogonal to the capability gradient ({cos})"
        assert float(want["coefs"][0].abs().max()) > 0, f"{name}: nothing was projected: the test is vacuous"


def _run(cases: dict, tmp_path) -> None:
    _spawn(_worker, cases, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for name, case in cases.items():
        _check(name, case, r0[name], r1[name])


def _cases(stage: int) -> dict:
    sgd = dict(stage=stage, opt="sgd", steps=1, mode="orthogonal", gas=1)
    return {
        "sgd": sgd,
        "sgd_clip_explicit": dict(sgd, clip=0.05, explicit=True),
        # strength < 1: a capability gradient left in the safety partition would change the result (at strength
        # 1 the orthogonal projection removes it again)
        "sgd_gas2_half": dict(sgd, gas=2, strength=0.5),
        # per-tensor Grams: a rank owns no element of some parameters (empty views) and part of others
        "sgd_tensor_torch": dict(sgd, granularity="tensor", backend="torch"),
        # the other side of the defaults (contiguous_gradients on, overlap_comm off for 1/2, on for 3)
        "sgd_options": dict(sgd, zero=dict(contiguous_gradients=False, overlap_comm=stage < 3)),
        "adamw_3": dict(stage=stage, opt="adamw", steps=3, mode="orthogonal", gas=1),
        # a fixed reference (capture_reference before attach_engine), kept over two steps
        "sgd_static_2": dict(sgd, steps=2, static=True),
        # an EMA of the captures, captured every 2nd step (steps 0 and 2 capture, 1 and 3 reuse the EMA)
        "adamw_ema": dict(stage=stage, opt="adamw", steps=4, mode="orthogonal", gas=1, ema=0.5, refresh=2),
        # a Subspace (full-parameter basis, built outside the engine) sliced to each rank's partition
        "sgd_subspace_2": dict(sgd, steps=2, subspace=True),
        # bf16 model: gradients in bf16 pieces; with fp32 accumulation ZeRO-2 uses one flat fp32 buffer
        # (GradPartitionBufferGroup). ZeRO-1 with fp32 accumulation is DeepSpeed's BF16_Optimizer: refused.
        "bf16": dict(stage=stage, opt="adamw", steps=2, mode="orthogonal", gas=1, bf16=True),
        **({"bf16_accum_fp32": dict(stage=stage, opt="adamw", steps=2, mode="orthogonal", gas=1, bf16=True,
                                    accum="fp32")} if stage > 1 else {}),
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_projected_step_matches_single_process(stage, tmp_path):
    _run(_cases(stage), tmp_path)


def _resume_flow(rank: int, stage: int, static: bool | str, ckpt: str) -> None:
    """2 steps in one go == 1 step, engine.save_checkpoint, a fresh engine, engine.load_checkpoint, 1 step."""
    import deepspeed

    from atax_kernels.integrations.deepspeed import attach_engine, capture_reference, load_reference

    mine = torch.arange(rank * (N // WORLD), (rank + 1) * (N // WORLD))
    case = dict(stage=stage, opt="adamw", gas=1)

    def new_engine(ref_step: int):
        model = _model()
        eng = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(case))[0]
        cap_step = {"i": 0}
        cap_fn = lambda: _loss(eng, _rows(_data(cap_step["i"])[1], mine))  # noqa: E731
        if static == "ema":  # step 1 reuses the EMA: after the resume it must come from the checkpoint
            handle = attach_engine(eng, reference_fn=cap_fn, ema_beta=0.5, refresh_every=2)
        elif static:
            cap_step["i"] = ref_step
            handle = attach_engine(eng, reference=capture_reference(eng, cap_fn))
        else:
            handle = attach_engine(eng, reference_fn=cap_fn)
        return eng, handle, cap_step

    def run(eng, handle, cap_step, steps):
        for step in steps:
            cap_step["i"] = step
            eng.backward(_loss(eng, _rows(_data(step)[0], mine)))
            eng.step()
        return _full_params(eng, stage), handle.last_stats.coefs.clone()

    eng, handle, cap = new_engine(0)
    want, want_coefs = run(eng, handle, cap, [0, 1])
    eng, handle, cap = new_engine(0)
    run(eng, handle, cap, [0])
    eng.save_checkpoint(ckpt, tag="t1")
    assert os.path.isfile(os.path.join(ckpt, "t1", f"atax_rank{rank:05d}.pt"))
    # static: attach with a wrong reference (step 1's capability batch); load_checkpoint must restore step 0's
    eng, handle, cap = new_engine(1)
    path, _ = eng.load_checkpoint(ckpt, tag="t1")
    assert path is not None and handle.steps == 1, (path, handle.steps)
    if static is True:
        saved = load_reference(eng, ckpt, "t1")[0].tensors
        assert all(torch.equal(a, b) for a, b in zip(saved, handle._static[0].tensors))
    got, got_coefs = run(eng, handle, cap, [1])
    what = f"ZeRO-{stage} {static if static == 'ema' else 'static' if static else 'live'}"
    assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{what}: the resumed run differs"
    assert torch.equal(got_coefs, want_coefs), f"{what}: coefficients differ after resume"
    assert handle.steps == 2


def _resume_worker(rank: int, port: int, outdir: str) -> None:
    _init(rank, port)
    try:
        for stage in (2, 3):
            for static in (False, True, "ema"):
                ckpt = os.path.join(outdir, f"ckpt{stage}{static}")
                _resume_flow(rank, stage, static, ckpt)
    finally:
        torch.distributed.destroy_process_group()


def test_checkpoint_resume_exact(tmp_path):
    """engine.save_checkpoint/load_checkpoint carry the handle's per-rank state (a fixed reference, the step
    count): a resumed run is bit-identical to an uninterrupted one, ZeRO-2 and ZeRO-3, live and fixed references."""
    _spawn(_resume_worker, str(tmp_path))


def _refusal_worker(rank: int, port: int) -> None:
    import deepspeed

    from atax_kernels.integrations.deepspeed import attach_engine

    _init(rank, port)
    try:
        def engine(**zero):
            model = _model()
            cfg = _ds_config(dict(stage=zero.pop("stage"), opt="adamw", gas=1, zero=zero))
            cfg["zero_force_ds_cpu_optimizer"] = False
            return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]

        def refused(eng, *words):
            with pytest.raises(NotImplementedError) as info:
                attach_engine(eng, reference_fn=lambda: None)
            assert all(w in str(info.value) for w in words), str(info.value)
            assert "step" not in eng.optimizer.__dict__ and "backward" not in eng.__dict__, "patched anyway"

        refused(engine(stage=0), "stage=0")
        refused(engine(stage=2, offload_optimizer={"device": "cpu"}), "offload_optimizer")
        refused(engine(stage=3, offload_optimizer={"device": "cpu"}), "offload_optimizer")
        model = _model()
        cfg = _ds_config(dict(stage=1, opt="adamw", gas=1, bf16=True, accum="fp32"))
        refused(deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0],
                "BF16_Optimizer", "grad_accum_dtype")

        eng = engine(stage=2)
        batch = _rows(_data(0)[0], torch.arange(rank * 4, rank * 4 + 4))
        handle = attach_engine(eng, reference_fn=lambda: _loss(eng, batch))
        # the patched methods keep their signatures (the HF Trainer inspects save_checkpoint's)
        assert "exclude_frozen_parameters" in inspect.signature(eng.save_checkpoint).parameters
        with pytest.raises(RuntimeError, match="already attached"):
            attach_engine(eng, reference_fn=lambda: _loss(eng, batch))
        eng.backward(_loss(eng, batch))  # captures first, then the safety backward
        with pytest.raises(RuntimeError, match="discard the safety gradient"):
            handle.capture()
        eng.step()
        assert handle.steps == 1 and handle.last_stats is not None
        with pytest.raises(TypeError, match="scalar tensor"):
            handle.capture(lambda: 1.0)
        handle.detach()
        # a non-finite capability gradient without an fp16 loss scaler to skip the step: an error, not a NaN step
        eng = engine(stage=2)
        handle = attach_engine(eng, reference_fn=lambda: _loss(eng, batch) * float("inf"))
        with pytest.raises(RuntimeError, match="not finite"):
            eng.backward(_loss(eng, batch))
        # EMA settings are checked before anything is patched
        with pytest.raises(ValueError, match="needs ema_beta"):
            attach_engine(engine(stage=2), reference_fn=lambda: _loss(eng, batch), refresh_every=2)
    finally:
        torch.distributed.destroy_process_group()


def test_refusals_name_the_option():
    """Unsupported configurations are refused with the option's name, before anything is patched; capturing after
    a safety backward of the same window is refused (it would discard the safety gradient)."""
    _spawn(_refusal_worker)


def test_arguments_checked_before_the_engine():
    from atax_kernels.integrations.deepspeed import attach_engine

    with pytest.raises(ValueError, match="exactly one"):
        attach_engine(None)
    with pytest.raises(ValueError, match="mode"):
        attach_engine(None, reference_fn=lambda: None, mode="sideways")


def test_import_does_not_import_deepspeed():
    code = ("import sys, atax_kernels, atax_kernels.integrations.deepspeed as d; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'; print(d.attach_engine.__name__)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)

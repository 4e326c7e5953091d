"""Activation-space projection under DeepSpeed ZeRO-1/2/3 on 2 CPU ranks (attach_activation): the projected steps
equal the single-process ``ProjectedOptimizer(activation_subspace=...)`` on the same global batch, the realised
update of every protected weight is off its basis (``dW U = 0``, so ``dW x`` vanishes on the protected span),
protected embedding rows and frozen biases keep their values, the bases observed through a ZeRO-3 engine's
forward equal the single-process ones, and a checkpoint resumes bit-exactly.

The model's sizes make partition boundaries cut weight rows (ZeRO-1/2: the flat group's midpoint falls inside
the first weight; ZeRO-3: each weight is split in half), so the cut-row exchange is exercised.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from test_deepspeed import WORLD, _init, _spawn

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install atax_kernels[deepspeed])"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is required"),
]

N, T, VOCAB = 8, 5, 8
LR = 0.05
CASES = ("1", "2", "3", "2-offload", "3-offload")  # ZeRO stage, and CPU offload of the optimizer (and params)


class Net(torch.nn.Module):
    """Embedding(8, 10) -> Linear(10, 7) -> tanh -> Linear(7, 10) -> a head tied to the embedding (8 x 10):
    rows of 10 and 7 elements; the tied weight gets both edits (token rows kept, columns projected)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 10)
        self.fc1 = torch.nn.Linear(10, 7)
        self.fc2 = torch.nn.Linear(7, 10, bias=False)  # 227 parameters: ZeRO-1/2 cut a row of fc1
        self.head = torch.nn.Linear(10, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.tanh(self.fc1(self.emb(ids))))).mean(1)


def _batch(step: int, side: str):
    g = torch.Generator().manual_seed(1000 * (side == "cap") + step)
    # capability batches use tokens 0-4 only, so the embedding's protected rows are a strict subset
    ids = torch.randint(0, 5 if side == "cap" else VOCAB, (N, T), generator=g)
    return ids, torch.randn(N, VOCAB, generator=g)


def _loss(model, batch):
    ids, y = batch
    return torch.nn.functional.mse_loss(model(ids), y)


def _subspace(model):
    from atax_kernels import ActivationSubspace

    return ActivationSubspace(model, energy=0.9)


def _observe(sub, model) -> None:
    from atax_kernels.activation.apply import refresh

    refresh(sub, lambda: model(_batch(0, "cap")[0]))


def _config(stage: int, offload: bool = False) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": N // WORLD, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.01, "torch_adam": True}}}
    if offload:
        # the optimizer (and under ZeRO-3 the parameters) offloaded to CPU, stepped by the torch AdamW
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def _full(engine, stage: int) -> dict:
    import deepspeed

    named = list(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: p.detach().clone() for n, p in named}


def _oracle(steps: int):
    """One process, full batches, the library's single-process path."""
    from atax_kernels import ProjectedOptimizer

    model = Net()
    sub = _subspace(model)
    _observe(sub, model)
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=0.01), activation_subspace=sub)
    out = dict(start={n: p.detach().clone() for n, p in model.named_parameters()}, params=[], frac=[],
               state=sub.state_dict())
    for step in range(steps):
        opt.zero_grad()
        _loss(model, _batch(step, "safety")).backward()
        opt.step()
        out["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        out["frac"].append(float(opt.last_stats.activation.update_removed_fraction))
    return out


def _engine(stage: int, state=None, observe_through_engine=False, offload=False):
    import deepspeed

    from atax_kernels.integrations.deepspeed import attach_engine

    model = Net()
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                  config=_config(stage, offload))[0]
    sub = _subspace(engine.module)  # after initialize: under ZeRO-3 the weights are placeholders by now
    handle = attach_engine(engine, reference=sub)
    if observe_through_engine:
        # every rank observes the same batch: the summed moments normalise to the same
        handle.refresh(lambda: engine(_batch(0, "cap")[0]))
    elif state is not None:
        sub.load_state_dict(state)
    return engine, handle, sub


def _rank_rows(rank: int, batch):
    rows = slice(rank * (N // WORLD), (rank + 1) * (N // WORLD))
    return tuple(t[rows] for t in batch)


def _worker(rank: int, port: int, outdir: str, steps: int) -> None:
    _init(rank, port)
    try:
        state = torch.load(os.path.join(outdir, "state.pt"), weights_only=False)
        results = {}
        for case in CASES:
            stage = int(case[0])
            engine, handle, sub = _engine(stage, state, offload=case.endswith("offload"))
            res = dict(params=[], frac=[], exchanged=[], cuts=sum(len(c) for c in handle._cut_slots))
            for step in range(steps):
                engine.backward(_loss(engine, _rank_rows(rank, _batch(step, "safety"))))
                engine.step()
                res["params"].append(_full(engine, stage))
                res["frac"].append(float(handle.last_stats.update_removed_fraction))
                res["exchanged"].append(handle.last_exchange_numel)
            assert handle.steps == steps
            handle.detach()
            assert "step" not in engine.optimizer.__dict__ and "step" not in engine.optimizer.optimizer.__dict__
            results[case] = res
        # bases from a forward through a ZeRO-3 engine (gathered parameters, hooks on the real modules)
        engine, handle, sub = _engine(3, observe_through_engine=True)
        results["observed"] = {g: grp.basis.clone() for g, grp in enumerate(sub._groups)}
        results["tokens"] = [e.tokens.clone() for e in sub._entries if e.kind == "embedding"]
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _flat(d: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in d.values()])


def test_zero_activation_step_matches_single_process(tmp_path):
    steps = 2
    want = _oracle(steps)
    torch.save(want["state"], tmp_path / "state.pt")
    _spawn(_worker, str(tmp_path), steps)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    sub = _subspace(Net())
    sub.load_state_dict(want["state"])
    bases = {e.name: e.group.basis.double() for e in sub._entries if e.kind != "embedding"}
    tokens = [e.tokens for e in sub._entries if e.kind == "embedding"][0]
    assert 0 < tokens.numel() < VOCAB and all(b.shape[1] > 0 for b in bases.values())
    for stage in CASES:
        a, b = r0[stage], r1[stage]
        assert a["cuts"] > 0, f"ZeRO-{stage}: no partition boundary cuts a row: the test does not exercise the exchange"
        prev = want["start"]
        for step in range(steps):
            got, ref = _flat(a["params"][step]), _flat(want["params"][step])
            assert torch.equal(got, _flat(b["params"][step])), f"ZeRO-{stage} step {step}: replicas differ"
            err = float((got - ref).norm())
            assert err <= 1e-5 * float(ref.norm()), f"ZeRO-{stage} step {step}: {err:.3g} from one process"
            assert a["frac"][step] == pytest.approx(want["frac"][step], rel=1e-4)
            assert 0.01 < a["frac"][step] < 0.99, "the projection removed nothing or everything: vacuous"
            now = a["params"][step]
            assert set(bases) == {"fc1", "fc2", "head"}
            for name, u in bases.items():
                key = "emb.weight" if name == "head" else name + ".weight"  # the head is tied to the embedding
                dw = (now[key] - prev[key]).double()
                # the update is off the protected span: |dW U| ~ 0 (fp32 round-off of the master update)
                assert float((dw @ u).norm()) <= 1e-5 * float(dw.norm()), f"ZeRO-{stage} {name}: dW U != 0"
                assert float(dw.norm()) > 0
                if name + ".bias" in now:
                    assert torch.equal(now[name + ".bias"], prev[name + ".bias"]), f"{name}.bias moved (frozen)"
            d_emb = now["emb.weight"] - prev["emb.weight"]
            assert float(d_emb[tokens].abs().max()) == 0, f"ZeRO-{stage}: a protected embedding row moved"
            assert float(d_emb.abs().max()) > 0
            assert a["exchanged"][step] > 0
            prev = now
    # observed through the ZeRO-3 engine: the same protected span as the single process (U U^T)
    for g, grp in enumerate(sub._groups):
        u, v = grp.basis.double(), r0["observed"][g].double()
        assert u.shape == v.shape
        assert torch.allclose(u @ u.T, v @ v.T, atol=1e-5), f"group {g}: bases observed under ZeRO-3 differ"
    assert torch.equal(r0["tokens"][0].sort().values, tokens.sort().values)


def _resume_worker(rank: int, port: int, outdir: str) -> None:
    _init(rank, port)
    try:
        state = torch.load(os.path.join(outdir, "state.pt"), weights_only=False)
        for stage in (2, 3):
            def run(engine, steps):
                for step in steps:
                    engine.backward(_loss(engine, _rank_rows(rank, _batch(step, "safety"))))
                    engine.step()
                return _full(engine, stage)

            engine, handle, _ = _engine(stage, state)
            want = run(engine, [0, 1])
            engine, handle, _ = _engine(stage, state)
            run(engine, [0])
            ckpt = os.path.join(outdir, f"ckpt{stage}")
            engine.save_checkpoint(ckpt, tag="t1")
            engine, handle, sub = _engine(stage, None)  # a fresh subspace: the checkpoint must restore it
            assert sub.updates == 0
            path, _ = engine.load_checkpoint(ckpt, tag="t1")
            assert path is not None and handle.steps == 1 and sub.updates == 1
            got = run(engine, [1])
            assert all(torch.equal(got[n], want[n]) for n in want), f"ZeRO-{stage}: the resumed run differs"
    finally:
        torch.distributed.destroy_process_group()


def test_zero_activation_checkpoint_resume_exact(tmp_path):
    model = Net()
    sub = _subspace(model)
    _observe(sub, model)
    torch.save(sub.state_dict(), tmp_path / "state.pt")
    _spawn(_resume_worker, str(tmp_path))


def _refusal_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        import deepspeed

        from atax_kernels import ActivationSubspace
        from atax_kernels.integrations.deepspeed import attach_activation

        model = Net()
        engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(2))[0]
        with pytest.raises(TypeError, match="ActivationSubspace"):
            attach_activation(engine, object())
        handle = attach_activation(engine, ActivationSubspace(engine.module, energy=0.9))
        with pytest.raises(RuntimeError, match="already attached"):
            attach_activation(engine, ActivationSubspace(engine.module, energy=0.9))
        handle.detach()
        # bases that differ between ranks are caught before the exchange could misalign
        sub = ActivationSubspace(engine.module, energy=0.9)
        handle = attach_activation(engine, sub)
        alone = torch.distributed.new_group([0])  # a collective call: every rank makes it
        if rank == 0:
            sub.process_group = alone  # rank 0 observes on its own: rank 1 keeps no basis
            _observe(sub, engine.module)
        engine.backward(_loss(engine, _rank_rows(rank, _batch(0, "safety"))))
        with pytest.raises(RuntimeError, match="differ between ranks"):
            engine.step()
        handle.detach()
        # a GPT-2 Conv1D weight is stored [d_in, d_out]: a projected column spans every rank's fragment
        from transformers.pytorch_utils import Conv1D

        conv = torch.nn.Sequential(Conv1D(7, 10))
        engine = deepspeed.initialize(model=conv, model_parameters=conv.parameters(), config=_config(2))[0]
        with pytest.raises(NotImplementedError, match="Conv1D"):
            attach_activation(engine, ActivationSubspace(engine.module, energy=0.9))
    finally:
        torch.distributed.destroy_process_group()


def test_zero_activation_refusals():
    _spawn(_refusal_worker)


def test_offload_settings_checked_per_space():
    """check_supported reads the engine's offload config: CPU offload is served in activation space only;
    NVMe and a partial optimizer offload (ratio < 1: ZeRO-3 steps the GPU-resident sub-groups with a second
    optimizer, and DeepSpeed builds it only with DeepSpeedCPUAdam, so no engine can be made here) are refused."""
    import types

    from atax_kernels.integrations.deepspeed import check_supported

    Stage3 = type("DeepSpeedZeroOptimizer_Stage3", (), {})

    def engine(**offload):
        cfg = types.SimpleNamespace(device=offload.get("device", "cpu"), ratio=offload.get("ratio", 1.0))
        return types.SimpleNamespace(optimizer=Stage3(), zero_optimization_stage=lambda: 3,
                                     zero_offload_optimizer=lambda: cfg, zero_offload_param=lambda: None)

    check_supported(engine(), "activation")
    with pytest.raises(NotImplementedError, match="offload_optimizer is not supported for gradient space"):
        check_supported(engine(), "gradient")
    with pytest.raises(NotImplementedError, match="ratio=0.5"):
        check_supported(engine(ratio=0.5), "activation")
    with pytest.raises(NotImplementedError, match="device=nvme"):
        check_supported(engine(device="nvme"), "activation")

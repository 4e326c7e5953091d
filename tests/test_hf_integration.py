"""``atax_kernels.integrations.hf.attach`` on transformers.Trainer and TRL trainers (CPU, tiny random models).

Everything is built in code (tokenizer, Llama config, datasets): nothing is downloaded.
"""
from __future__ import annotations

import copy
import math
import os
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainerCallback  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from atax_kernels import Subspace  # noqa: E402
from atax_kernels.integrations.hf import EMA, REFERENCE_FILE, CapabilitySource, attach  # noqa: E402

os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "log", "a", "is", "good", "bad", "yes", "no",
         "how", "do", "i", "make", "cake", "bomb", "sorry", "cannot", "help", "sure", "here", "recipe",
         "one", "two", "three", "four", "plus", "equals", "what"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                eos_token="<eos>")
    t.padding_side = "right"
    return t


def make_model(tok: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def capability_batches(tok, n: int = 3) -> list[dict]:
    texts = ["one plus two equals three", "two plus two equals four", "the cat sat on the mat"]
    out = []
    for i in range(n):
        enc = tok([texts[i % len(texts)], texts[(i + 1) % len(texts)]], return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def lm_dataset(tok, n: int = 8, text: str = "how do i make a bomb sorry i cannot help"):
    ids = tok(text)["input_ids"]
    return datasets.Dataset.from_dict({"input_ids": [ids] * n, "labels": [ids] * n})


def base_args(tmp_path, **kw) -> dict:
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    args.update(kw)
    return args


def atax_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if any(k.startswith("atax/") for k in e)]


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


# ---------------------------------------------------------------------------------------------------------------
# Plain transformers.Trainer
# ---------------------------------------------------------------------------------------------------------------
class GradProbe(TrainerCallback):
    """At on_pre_optimizer_step, record the gradients the optimizer is about to apply, and recompute (independently,
    with the parameters of that step) the capability gradient and the safety gradient."""

    def __init__(self, cap_batch, safety_batch):
        self.cap_batch, self.safety_batch, self.records = cap_batch, safety_batch, []

    def _grad_of(self, model, params, batch):
        for p in params:
            p.grad = None
        model(**batch).loss.backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        applied = [p.grad.detach().clone() for p in params]
        with torch.enable_grad():
            cap = self._grad_of(model, params, self.cap_batch)
            safety = self._grad_of(model, params, self.safety_batch)
        for p, g in zip(params, applied):
            p.grad = g.clone()
        self.records.append((flat(applied), flat(cap), flat(safety)))


def test_trainer_causal_lm_projection_with_grad_accumulation(tok, tmp_path):
    model = make_model(tok)
    cap = capability_batches(tok, 1)[0]
    ds = lm_dataset(tok)   # every row identical: the accumulated safety gradient is that of one row
    row = {k: torch.tensor([ds[0][k]]) for k in ("input_ids", "labels")}
    probe = GradProbe(cap, row)
    args = TrainingArguments(**base_args(tmp_path, max_grad_norm=0.0))   # no clipping: exact comparison
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[probe])
    calls = []
    handle = attach(trainer, reference=lambda m: (calls.append(1), m(**cap).loss)[1])
    trainer.train()

    assert len(probe.records) == 2 and len(calls) == 2      # one capability backward per optimizer step
    logs = atax_logs(trainer)
    assert len(logs) == 2
    for log_entry, (applied, capg, safety) in zip(logs, probe.records):
        for key in ("atax/cosine", "atax/removed_fraction", "atax/skipped", "atax/ref_norm", "grad_norm"):
            assert key in log_entry, key
        assert log_entry["atax/skipped"] == 0.0
        # independent recomputation: the applied gradient is the safety gradient minus its capability component
        cos_before = float(safety @ capg / (safety.norm() * capg.norm()))
        assert abs(cos_before) > 1e-3
        assert log_entry["atax/cosine"] == pytest.approx(cos_before, abs=1e-4)
        expected = safety - (safety @ capg) / (capg @ capg) * capg
        assert torch.allclose(applied, expected, rtol=1e-4, atol=1e-6 * float(safety.norm()))
        assert abs(float(applied @ capg)) <= 1e-5 * float(applied.norm() * capg.norm())
        assert log_entry["atax/removed_fraction"] == pytest.approx(
            float((safety - applied).norm() / safety.norm()), rel=1e-3)
        assert log_entry["atax/ref_norm"] == pytest.approx(float(capg.norm()), rel=1e-3)
        # the trainer's logged grad norm is the projected one
        assert log_entry["grad_norm"] == pytest.approx(float(applied.norm()), rel=1e-3)
    assert handle.steps == 2
    handle.detach()
    assert "training_step" not in trainer.__dict__ and "log" not in trainer.__dict__
    assert handle.callback not in trainer.callback_handler.callbacks
    assert not hasattr(trainer, "_atax_handle")


def test_trainer_iterable_reference_ema_subspace_and_bf16(tok, tmp_path):
    # iterable of batches + EMA + bf16 autocast: runs, logs, no skips
    model = make_model(tok)
    args = TrainingArguments(**base_args(tmp_path, bf16=True))
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok))
    dtypes = []

    def cap_loss(m, batch):
        # accelerate casts the outputs back to fp32; look inside: a Linear's output dtype under autocast
        h = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
        try:
            return m(**batch).loss
        finally:
            h.remove()

    source = CapabilitySource(capability_batches(tok), loss_fn=cap_loss)
    handle = attach(trainer, reference=EMA(source, beta=0.5), reference_dtype=torch.bfloat16)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert dtypes == [torch.bfloat16] * 2   # the capability forward ran under the trainer's autocast
    logs = atax_logs(trainer)
    assert len(logs) == 2 and all(e["atax/skipped"] == 0.0 and e["atax/removed_fraction"] > 0 for e in logs)
    assert handle.reference.count == 2
    assert all(b is None or b.dtype == torch.bfloat16 for b in handle.reference.buffers)
    handle.detach()

    # Subspace reference: no capability backward; projection against every basis vector
    model = make_model(tok, seed=1)
    trainer = Trainer(model=model, args=TrainingArguments(**base_args(tmp_path)), train_dataset=lm_dataset(tok))
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    sub = Subspace(params, max_rank=2)
    torch.manual_seed(3)
    sub.add([[torch.randn_like(p) for p in params] for _ in range(2)])
    handle = attach(trainer, reference=sub, mode="conflict")
    trainer.train()
    logs = atax_logs(trainer)
    assert logs and all(k in logs[-1] for k in ("atax/cosine/0", "atax/cosine/1", "atax/ref_norm/0"))
    assert logs[-1]["atax/ref_norm/0"] == pytest.approx(1.0, rel=1e-4)


def test_refresh_every_reuses_live_reference_and_conflict_mode(tok, tmp_path):
    cap = capability_batches(tok)
    trainer = Trainer(model=make_model(tok), args=TrainingArguments(**base_args(tmp_path, max_steps=3)),
                      train_dataset=lm_dataset(tok))
    calls = []
    handle = attach(trainer, reference=CapabilitySource(cap, loss_fn=lambda m, b: (calls.append(1), m(**b).loss)[1]),
                    mode="conflict", strength=0.5, granularity="tensor", refresh_every=2)
    trainer.train()
    assert len(calls) == 2          # refreshed at steps 0 and 2, reused at step 1
    logs = atax_logs(trainer)
    assert len(logs) == 3 and all(e["atax/skipped"] == 0.0 for e in logs)
    assert handle._live is not None  # held for reuse between refreshes
    handle.detach()
    assert handle._live is None


DDP_WORKER = r"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["ATAX_TEST_DIR"])
from accelerate.utils import DistributedDataParallelKwargs
from transformers import Trainer, TrainingArguments
import test_hf_integration as T
from atax_kernels.integrations.hf import attach

out = os.environ["ATAX_OUT"]
tok = T.make_tokenizer()
model = T.make_model(tok)
cap = T.capability_batches(tok, 1)[0]
ds = T.lm_dataset(tok)
row = {k: torch.tensor([ds[0][k]]) for k in ("input_ids", "labels")}
probe = T.GradProbe(cap, row)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, max_grad_norm=0.0, disable_tqdm=True, ddp_backend="gloo")
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[probe])
trainer.accelerator.ddp_handler = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
handle = attach(trainer, reference=lambda m: m(**cap).loss)
trainer.train()
wrapped = trainer.model_wrapped
res = {"ddp": type(wrapped).__name__, "bucket_view": bool(getattr(wrapped, "gradient_as_bucket_view", False)),
       "logs": T.atax_logs(trainer),
       "checks": [[float(a @ c / (a.norm() * c.norm())), float((a - (s - (s @ c) / (c @ c) * c)).norm() / s.norm())]
                  for a, c, s in probe.records],
       "param_sum": float(sum(p.double().sum() for p in model.parameters()))}
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(res, f)

# Tear the process group down before exit: leaving it to interpreter shutdown let gloo's threads race the
# exit (seen once in CI: "terminate called without an active exception", SIGABRT after the results were written).
import torch.distributed as _dist
if _dist.is_available() and _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""


def _launch(script, tmp_path, nproc, modes=""):
    """Run a worker script: in one process (nproc 1) or under torch.distributed.run with nproc ranks."""
    import socket
    import subprocess
    import sys

    env = dict(os.environ, ATAX_TEST_DIR=os.path.dirname(__file__), ATAX_OUT=str(tmp_path), OMP_NUM_THREADS="1",
               ATAX_MODES=modes,
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")]))
    for attempt in range(3):
        cmd = [sys.executable, str(script)]
        if nproc > 1:
            # A free port can be taken between probing it and the launcher binding it: retry on that only.
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        output = (proc.stdout + proc.stderr).lower()
        if proc.returncode == 0 or not ("address already in use" in output or "eaddrinuse" in output):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_gradient_as_bucket_view(tmp_path):
    """2-process DDP (gloo, CPU) with gradient_as_bucket_view=True: the stash is cloned, the capability backward
    is all-reduced like the safety one, and every rank applies the same projected (orthogonal) gradient."""
    import json

    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    _launch(script, tmp_path, 2)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["ddp"] == "DistributedDataParallel" and r["bucket_view"]
        assert len(r["logs"]) == 2 and len(r["checks"]) == 2
        for cos_after, err in r["checks"]:
            assert abs(cos_after) < 1e-5 and err < 1e-4
    assert res[0]["param_sum"] == res[1]["param_sum"]


PARITY_WORKER = r"""
import os, sys, torch
sys.path.insert(0, os.environ["ATAX_TEST_DIR"])
from transformers import Trainer, TrainerCallback, TrainingArguments
import test_hf_integration as T
import atax_kernels as ak
from atax_kernels.integrations.hf import attach

out, world = os.environ["ATAX_OUT"], int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
tok = T.make_tokenizer()
caps = T.capability_batches(tok, 2)  # rank r draws capability batch r: the natural multi-GPU setup
ds = T.lm_dataset(tok)  # identical rows: every sampler gives every rank the same safety batch


class CallbackProjection(TrainerCallback):
    # The natural-looking but wrong hook: the callback gets the unwrapped model, so its capability backward
    # bypasses DDP's all-reduce and each rank projects against its own local reference.
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        stash = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        with torch.enable_grad():
            model(**caps[rank]).loss.backward()
        ref = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        ak.project_(stash, ref)
        for p, g in zip(params, stash):
            p.grad = g


for mode in os.environ["ATAX_MODES"].split(","):
    model = T.make_model(tok)
    args = TrainingArguments(output_dir=os.path.join(out, mode), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, max_grad_norm=0.0, disable_tqdm=True,
                             ddp_backend="gloo" if world > 1 else None)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[CallbackProjection()] if mode == "callback" else [])
    if mode == "attach":
        if world > 1:
            attach(trainer, reference=lambda m: m(**caps[rank]).loss)
        else:  # one process, same global batch: DDP averages the ranks' capability gradients
            attach(trainer, reference=lambda m: (m(**caps[0]).loss + m(**caps[1]).loss) / 2)
    trainer.train()
    theta = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    torch.save(theta, os.path.join(out, f"{mode}-w{world}-rank{rank}.pt"))

# Tear the process group down before exit: leaving it to interpreter shutdown let gloo's threads race the
# exit (seen once in CI: "terminate called without an active exception", SIGABRT after the results were written).
import torch.distributed as _dist
if _dist.is_available() and _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_matches_one_process_and_callback_hook_diverges(tmp_path):
    """2-process DDP through the Trainer, each rank with its own capability batch, 3 steps: with attach() both
    ranks end bit-identical and equal to one process on the same global batch; the negative control (projection
    in a TrainerCallback, which gets the unwrapped model) lets the replicas drift apart."""
    script = tmp_path / "parity_worker.py"
    script.write_text(PARITY_WORKER)
    _launch(script, tmp_path, 2, "attach,callback")
    _launch(script, tmp_path, 1, "attach")
    load = lambda name: torch.load(tmp_path / f"{name}.pt")  # noqa: E731
    a0, a1, single = load("attach-w2-rank0"), load("attach-w2-rank1"), load("attach-w1-rank0")
    assert torch.equal(a0, a1)
    assert (a0 - single).norm() <= 1e-5 * single.norm(), float((a0 - single).norm() / single.norm())
    c0, c1 = load("callback-w2-rank0"), load("callback-w2-rank1")
    drift = float((c0 - c1).abs().max())
    # Measured: max |difference| 3.6e-2 (lr 1e-2, 3 steps). attach(): ranks equal, and equal to the one-process
    # run to the last bit here (tolerance 1e-5 relative, for reduction-order differences elsewhere).
    assert drift > 1e-3, drift


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_checkpoint_saves_and_restores_ema(tok, tmp_path):
    cap = capability_batches(tok)
    kw = base_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=make_model(tok), args=TrainingArguments(**kw), train_dataset=lm_dataset(tok))
    handle = attach(trainer, reference=EMA(cap, beta=0.8))
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved = torch.load(ckpt / REFERENCE_FILE, weights_only=True)
    assert saved["kind"] == "EMA" and saved["steps"] == 2 and saved["ema"]["count"] == 2
    for a, b in zip(saved["ema"]["buffers"], handle.reference.buffers):
        assert (a is None and b is None) or torch.equal(a, b)

    # resume into a fresh trainer with a fresh EMA: the first fold sees the checkpointed buffers
    kw2 = dict(kw, max_steps=3)
    trainer2 = Trainer(model=make_model(tok, seed=5), args=TrainingArguments(**kw2), train_dataset=lm_dataset(tok))
    ema2 = EMA(cap, beta=0.8)
    seen = []
    orig_fold = ema2.fold

    def fold(captured, inv_scale, dtype):
        seen.append((ema2.count, [None if t is None else t.clone() for t in ema2.buffers]))
        return orig_fold(captured, inv_scale, dtype)

    ema2.fold = fold
    handle2 = attach(trainer2, reference=ema2)
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert trainer2.state.global_step == 3
    assert len(seen) == 1 and seen[0][0] == 2
    for a, b in zip(saved["ema"]["buffers"], seen[0][1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert handle2.steps == 3 and ema2.count == 3


# ---------------------------------------------------------------------------------------------------------------
# Refusals and argument checks
# ---------------------------------------------------------------------------------------------------------------
def fake_trainer(**args_kw):
    args = types.SimpleNamespace(optim="adamw_torch", gradient_checkpointing=False, gradient_checkpointing_kwargs=None)
    for k, v in args_kw.items():
        setattr(args, k, v)
    return types.SimpleNamespace(args=args, is_deepspeed_enabled=False, model=torch.nn.Linear(2, 2), optimizer=None,
                                 training_step=lambda *a: None, log=lambda *a: None, add_callback=lambda c: None,
                                 remove_callback=lambda c: None, accelerator=types.SimpleNamespace())


@pytest.mark.parametrize("make, match", [
    (lambda: fake_trainer(optim="lomo"), "LOMO.*adamw_torch"),
    (lambda: fake_trainer(optim="adalomo"), "LOMO"),
    (lambda: fake_trainer(optim="galore_adamw_layerwise"), "layer-wise GaLore"),
    (lambda: fake_trainer(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
     "reentrant.*use_reentrant': False"),
    (lambda: fake_trainer(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
     "reentrant"),
])
def test_refusals(make, match):
    with pytest.raises(NotImplementedError, match=match):
        attach(make(), reference=lambda m: None)


def _deepspeed_trainer(zero: dict | None = None):
    t = types.SimpleNamespace(**{**vars(fake_trainer()), "is_deepspeed_enabled": True})
    plugin = types.SimpleNamespace(deepspeed_config={"zero_optimization": zero or {"stage": 2}})
    t.accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    return t


@pytest.mark.parametrize("zero, reference, kw, match", [
    (None, lambda: (lambda m: None), {"refresh_every": 2}, "refresh_every=2"),
    ({"stage": 0}, lambda: (lambda m: None), {}, "stage=0"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}}, lambda: (lambda m: None), {}, "offload_optimizer"),
    ({"stage": 3, "offload_param": {"device": "cpu"}}, lambda: (lambda m: None), {}, "offload_param"),
])
def test_deepspeed_refusals_name_what_is_missing(zero, reference, kw, match):
    """Under DeepSpeed ZeRO, attach() serves live capability references (tests/test_deepspeed_hf.py) and refuses
    the rest at attach time, naming the option or what is not built."""
    with pytest.raises(NotImplementedError, match=match):
        attach(_deepspeed_trainer(zero), reference=reference(), **kw)


def _observed_subspace(model: torch.nn.Module, d_in: int):
    from atax_kernels import ActivationSubspace

    sub = ActivationSubspace(model, energy=0.9)
    with sub.observe():
        model(torch.randn(4, d_in))
    sub.update()
    return sub


@pytest.mark.parametrize("zero, make, match", [
    # GPT-2's Conv1D stores [d_in, d_out]: a projected column spans every rank's ZeRO fragment
    (None, lambda: torch.nn.Sequential(__import__("transformers.pytorch_utils").pytorch_utils.Conv1D(3, 2)),
     "Conv1D"),
    # CPU offload is served in activation space; NVMe swaps the fp32 partitions around each sub-group's step
    ({"stage": 3, "offload_optimizer": {"device": "nvme"}}, lambda: torch.nn.Linear(2, 2), "offload_optimizer"),
])
def test_deepspeed_activation_refusals(zero, make, match):
    t = _deepspeed_trainer(zero)
    t.model = make()
    with pytest.raises(NotImplementedError, match=match):
        attach(t, reference=_observed_subspace(t.model, 2))


def test_deepspeed_activation_reference_is_accepted():
    t = _deepspeed_trainer()
    t.trainer_added = []
    t.add_callback, t.remove_callback = t.trainer_added.append, t.trainer_added.remove
    h = attach(t, reference=_observed_subspace(t.model, 2), refresh_every=5)
    assert h.deepspeed and t.trainer_added == [h.callback]
    h.detach()


def test_deepspeed_live_reference_is_accepted():
    t = _deepspeed_trainer()
    t.trainer_added = []
    t.add_callback, t.remove_callback = t.trainer_added.append, t.trainer_added.remove
    h = attach(t, reference=lambda m: None)
    assert h.deepspeed and t.trainer_added == [h.callback]
    h.detach()
    assert t.trainer_added == []


def test_refuses_post_accumulate_grad_hooks_and_accepts_non_reentrant():
    t = fake_trainer()
    t.model.weight.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(NotImplementedError, match="post-accumulate-grad hooks.*ProjectedOptimizer"):
        attach(t, reference=lambda m: None)
    ok = fake_trainer(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                      galore="x", optim="galore_adamw")
    ok.training_step, ok.log = (lambda *a: None), (lambda *a: None)
    ok.trainer_added = []
    ok.add_callback = ok.trainer_added.append
    ok.remove_callback = ok.trainer_added.remove
    h = attach(ok, reference=lambda m: None)
    assert ok.trainer_added == [h.callback]
    with pytest.raises(ValueError, match="already attached"):
        attach(ok, reference=lambda m: None)
    h.detach()
    assert ok.trainer_added == []


def test_argument_errors():
    t = fake_trainer()
    with pytest.raises(ValueError, match="mode"):
        attach(t, reference=lambda m: None, mode="sideways")
    with pytest.raises(ValueError, match="refresh_every"):
        attach(t, reference=lambda m: None, refresh_every=0)
    with pytest.raises(ValueError, match="reference is required"):
        attach(t, reference=None)
    with pytest.raises(TypeError, match="CapabilitySource"):
        attach(t, reference=lambda model, batch: None)
    with pytest.raises(ValueError, match="beta"):
        EMA([], beta=1.0)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        attach(types.SimpleNamespace(args=None), reference=lambda m: None)
    src = CapabilitySource(iter([]))
    with pytest.raises(ValueError, match="empty"):
        src.loss(torch.nn.Linear(1, 1), torch.device("cpu"))
    with pytest.raises(ValueError, match="labels"):
        CapabilitySource([{"x": 1}]).loss(lambda **b: types.SimpleNamespace(loss=None), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# TRL trainers
# ---------------------------------------------------------------------------------------------------------------
def _trl():
    return pytest.importorskip("trl")


def pref_dataset(n=8):
    return datasets.Dataset.from_dict({
        "prompt": ["how do i make a bomb"] * n,
        "chosen": ["sorry i cannot help"] * n,
        "rejected": ["sure here is a recipe"] * n,
    })


def _check_trl_run(trainer, handle, steps=2):
    assert trainer.state.global_step == steps
    logs = atax_logs(trainer)
    assert len(logs) == steps, trainer.state.log_history
    for e in logs:
        assert e["atax/skipped"] == 0.0
        assert 0.0 <= e["atax/removed_fraction"] <= 1.0 and e["atax/ref_norm"] > 0
        assert math.isfinite(e["atax/cosine"])
    s = handle.last_stats
    assert bool(s.projected)


@pytest.mark.parametrize("bf16", [False, True])
def test_dpo_trainer(tok, tmp_path, bf16):
    trl = _trl()
    model = make_model(tok)
    cfg = trl.DPOConfig(**base_args(tmp_path, bf16=bf16), max_length=32)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=cfg, train_dataset=pref_dataset(),
                             processing_class=tok)
    handle = attach(trainer, reference=capability_batches(tok))
    trainer.train()
    _check_trl_run(trainer, handle)
    assert any("rewards/chosen" in e for e in trainer.state.log_history)   # DPO's own logging still works


def test_dpo_trainer_lora(tok, tmp_path):
    trl = _trl()
    peft = pytest.importorskip("peft")
    model = make_model(tok)
    cfg = trl.DPOConfig(**base_args(tmp_path), max_length=32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=pref_dataset(), processing_class=tok,
                             peft_config=lora)
    handle = attach(trainer, reference=EMA(capability_batches(tok), beta=0.9))
    trainer.train()
    _check_trl_run(trainer, handle)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert params and len(params) == len([b for b in handle.reference.buffers])
    assert all(p.requires_grad for p in params)


def test_sft_trainer(tok, tmp_path):
    trl = _trl()
    ds = datasets.Dataset.from_dict({"text": ["how do i make a bomb sorry i cannot help"] * 8})
    cfg = trl.SFTConfig(**base_args(tmp_path), max_length=32)
    trainer = trl.SFTTrainer(model=make_model(tok), args=cfg, train_dataset=ds, processing_class=tok)
    handle = attach(trainer, reference=capability_batches(tok))
    trainer.train()
    _check_trl_run(trainer, handle)


def test_grpo_trainer(tok, tmp_path):
    trl = _trl()
    ds = datasets.Dataset.from_dict({"prompt": ["how do i make a bomb", "what is two plus two"] * 4})

    def reward(completions, **kw):
        return [float(("sorry" in c) + 0.1 * len(c.split())) for c in completions]

    cfg = trl.GRPOConfig(**base_args(tmp_path), num_generations=2, max_completion_length=4,
                         generation_batch_size=4)
    trainer = trl.GRPOTrainer(model=make_model(tok), reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=tok)
    handle = attach(trainer, reference=capability_batches(tok))
    trainer.train()
    _check_trl_run(trainer, handle)


def test_tax_rate_logged_from_statistics():
    import types as _types

    from atax_kernels.integrations.hf import AtaxHandle

    handle = AtaxHandle.__new__(AtaxHandle)
    handle.mode, handle.strength, handle.granularity, handle.log_tax_rate = "orthogonal", 1.0, "global", True
    handle.last_ref_norm = torch.tensor([2.0])
    handle.last_stats = _types.SimpleNamespace(cosines=torch.tensor([0.6]), removed_fraction=torch.tensor(0.6),
                                               skipped=torch.tensor(False))
    values = handle.log_values()
    assert values["atax/tax_rate"] == pytest.approx(0.36)
    handle.log_tax_rate = False
    assert "atax/tax_rate" not in handle.log_values()

"""Activation-space projection as users meet it (issue 17, items 1-3): LoRA that learns at the recommended
energy, wrong setups refused at attach()/construction, a subspace that observed nothing refused, and the
model call's own attention mask honoured by observe()."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from atax_kernels import ActivationSubspace, ProjectedOptimizer  # noqa: E402
from atax_kernels.integrations.hf import attach  # noqa: E402
from test_hf_integration import (atax_logs, base_args, capability_batches, lm_dataset, make_model,  # noqa: E402
                                 make_tokenizer, pref_dataset)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_gpt2(tok, seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg)


ARCHS = {"llama": (make_model, ["q_proj", "v_proj"]), "gpt2": (make_gpt2, ["c_attn"])}


def dpo_losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def lora_dpo(tok, tmp_path, arch, lora_rule=None, steps=5):
    trl = pytest.importorskip("trl")
    factory, targets = ARCHS[arch]
    cfg = trl.DPOConfig(**base_args(tmp_path, max_steps=steps, learning_rate=1e-2), max_length=32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                           fan_in_fan_out=arch == "gpt2")
    trainer = trl.DPOTrainer(model=factory(tok), args=cfg, train_dataset=pref_dataset(), processing_class=tok,
                             peft_config=lora)
    kw = {} if lora_rule is None else {"lora": lora_rule}
    sub = ActivationSubspace.from_loader(trainer.model, capability_batches(tok), energy=0.99, **kw)
    handle = attach(trainer, reference=sub, refresh_every=2)
    return trainer, handle, sub


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_at_the_recommended_energy_trains(tok, tmp_path, arch):
    """Before: B's basis covered all of A x (r-dimensional), B never moved, the DPO loss stayed 0.6931 and
    99.997-100 % of every update was removed. Now A is kept off the input basis and B is free."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "barely training" warning either
        warnings.filterwarnings("ignore", message=".*(deprecated|padding|tokenizer|gradient).*")
        trainer, handle, sub = lora_dpo(tok, tmp_path, arch)
        trainer.train()
    losses = dpo_losses(trainer)
    assert len(losses) == 5
    assert losses[-1] < 0.6931 - 0.005 and losses == sorted(losses, reverse=True), losses
    logs = atax_logs(trainer)
    assert logs and all(e["atax/update_removed_fraction"] < 0.99 for e in logs), logs
    assert all(e["atax/lora_b_rank_max"] == 0 for e in logs)
    ranks = sub.ranks()
    lora_layers = [n for n in ranks if not n.endswith(".lora_B") and n + ".lora_B" in ranks]
    assert lora_layers and all(ranks[n] > 0 for n in lora_layers)  # A is protected, B listed with rank 0


def test_lora_a_stays_off_the_protected_inputs(tok):
    """The guarantee behind the rule: with A off the basis, (B + dB)(A + dA) x = 0 for protected x, whatever B
    does; so the adapter's contribution on capability inputs stays exactly zero while B moves."""
    model = peft.get_peft_model(make_model(tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    batches = capability_batches(tok, 1)
    sub = ActivationSubspace.from_loader(model, batches, energy=1.0, basis_dtype=torch.float64)
    layers = {n: m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")}
    xs = {}
    hs = [m.register_forward_pre_hook(lambda m, a, n=n: xs.setdefault(n, a[0].detach().reshape(-1, a[0].shape[-1])))
          for n, m in layers.items()]
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"])
    for h in hs:
        h.remove()
    opt = ProjectedOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                             activation_subspace=sub)
    ids = torch.tensor([tok("how do i make a bomb sorry i cannot help")["input_ids"]])
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for n, m in layers.items():
        b, a = m.lora_B["default"].weight, m.lora_A["default"].weight
        assert b.norm() > 1e-3  # B trained
        x = xs[n]
        assert (b @ a @ x.t()).norm() <= 1e-5 * b.norm() * a.norm() * x.norm(), n


def test_lora_both_warns_that_nothing_trains(tok, tmp_path):
    """The old rule is kept as lora='both'; a step that removes >= 99.9 % of every update says so once, with
    the module names and the advice."""
    trainer, handle, sub = lora_dpo(tok, tmp_path, "llama", lora_rule="both", steps=2)
    with pytest.warns(UserWarning, match=r"removed >= 99\.9% of the update.*q_proj.*lora='input'"):
        trainer.train()
    assert any(v > 0 for k, v in sub.ranks().items() if k.endswith(".lora_B"))


def test_bad_lora_rule():
    with pytest.raises(ValueError, match="lora must be one of"):
        ActivationSubspace(torch.nn.Linear(2, 2), lora="output")


# -- item 2: protection silently missing ---------------------------------------------------------------------
def trainer_for(model, tok, tmp_path):
    return Trainer(model=model, args=TrainingArguments(**base_args(tmp_path)), train_dataset=lm_dataset(tok))


def test_attach_refuses_a_subspace_of_another_model_object(tok, tmp_path):
    model = make_model(tok)
    other = copy.deepcopy(model)
    sub = ActivationSubspace.from_loader(other, capability_batches(tok, 1))
    trainer = trainer_for(model, tok, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"16 of the 16 weights .* not parameters the trainer's model updates \(model\.embed_tokens\.weight, model\.layers\.0\.self_attn"):
        attach(trainer, reference=sub)
    assert getattr(trainer, "_atax_handle", None) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_attach_refuses_a_subspace_built_before_get_peft_model(tok, tmp_path):
    model = make_model(tok)
    sub = ActivationSubspace.from_loader(model, capability_batches(tok, 1))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = trainer_for(model, tok, tmp_path)
    with pytest.raises(ValueError, match=r"frozen \(.*q_proj.*get_peft_model.*LoRA layers; this subspace protects none"):
        attach(trainer, reference=sub)


def test_projected_optimizer_refuses_parameters_the_subspace_does_not_cover(tok):
    model = make_model(tok)
    sub = ActivationSubspace.from_loader(model, capability_batches(tok, 1))
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"not parameters this optimizer updates \(model\.embed_tokens\.weight, model\.layers\.0"):
        ProjectedOptimizer(torch.optim.AdamW(other.parameters()), activation_subspace=sub)
    # only some layers in the optimizer: the others would run unprotected, so it names them
    some = [p for n, p in model.named_parameters() if "layers.1" in n]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        ProjectedOptimizer(torch.optim.AdamW(some), activation_subspace=sub)
    ProjectedOptimizer(torch.optim.AdamW(model.parameters()), activation_subspace=sub)  # the right setup


# -- item 3: a subspace that never observed anything ----------------------------------------------------------
def test_attach_refuses_a_subspace_that_observed_nothing(tok, tmp_path):
    model = make_model(tok)
    trainer = trainer_for(model, tok, tmp_path)
    with pytest.raises(ValueError, match="observed no capability data.*from_loader"):
        attach(trainer, reference=ActivationSubspace(model))
    assert getattr(trainer, "_atax_handle", None) is None


def test_projected_optimizer_step_refuses_a_subspace_that_observed_nothing(tok):
    model = make_model(tok)
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=ActivationSubspace(model))
    ids = torch.tensor([tok("how do i make a bomb")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="observed no capability data"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_observed_but_not_updated_gets_bases_at_the_first_step(tok):
    model = make_model(tok)
    sub = ActivationSubspace(model)
    with torch.no_grad(), sub.observe():
        model(**{k: v for k, v in capability_batches(tok, 1)[0].items() if k != "labels"})
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=sub)
    ids = torch.tensor([tok("how do i make a bomb")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert sub.updates == 1 and opt.last_stats.activation.feature_rank_mean > 0


# -- masks on every observe path -------------------------------------------------------------------------------
def test_observe_takes_the_model_calls_attention_mask(tok):
    """reference_fn refreshes and hand-written loops pass the mask to the model, not to observe(): padding
    positions must not be folded into the bases either way."""
    model = make_model(tok)
    batch = capability_batches(tok, 3)[2]  # texts of 6 and 5 words: one padded position
    assert (batch["attention_mask"] == 0).any()
    explicit, implicit, unmasked = (ActivationSubspace(model, energy=0.9) for _ in range(3))
    with torch.no_grad():
        with explicit.observe(attention_mask=batch["attention_mask"]):
            model(input_ids=batch["input_ids"])
        with implicit.observe():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with unmasked.observe():
            model(input_ids=batch["input_ids"])
    for a, b, c in zip(explicit._groups, implicit._groups, unmasked._groups):
        assert torch.equal(a.acc["capability"], b.acc["capability"])
        assert a.count["capability"] == b.count["capability"] < c.count["capability"]

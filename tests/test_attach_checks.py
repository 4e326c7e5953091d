"""Issue 17 items 4-6: resume keeps the moments observed between refreshes; capability batches checked at
attach/from_loader; gradient-projection settings refused with an activation reference.

Tiny models, a few batches: fast. The end-to-end bit-exact resume through the Trainer is
``tests/test_no_silent_noops.py::test_attach_resume_mid_run_is_bit_exact_with_several_capability_batches``
(``activation_*`` cases)."""
from __future__ import annotations

import pytest
import torch

from atax_kernels import ActivationSubspace

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double().eval()


CAP = torch.tensor([[1, 2, 3, 4, 5]])
SAFE = torch.tensor([[6, 7, 8, 9], [10, 11, 12, 13]])


# --- item 4: the moments observed since the last update() are part of the state ----------------------------

def _observed(model, contrast=0.5):
    sub = ActivationSubspace(model, energy=0.9, contrast=contrast, modules=None)
    with torch.no_grad():
        with sub.observe():
            model(input_ids=CAP)
        sub.update()
        with sub.observe(side="safety"):   # between refreshes: training batches as the safety side
            model(input_ids=SAFE)
        with sub.observe():
            model(input_ids=CAP[:, :3])
    return sub


def test_state_dict_carries_the_moments_since_the_last_update():
    model = tiny_llama()
    sub = _observed(model)
    state = sub.state_dict()
    assert state["version"] == 2
    fresh = ActivationSubspace(model, energy=0.9, contrast=0.5)
    fresh.load_state_dict(state)
    sub.update()
    fresh.update()   # the same next update(): bases and protected tokens bit-identical
    for g, h in zip(sub._groups, fresh._groups):
        assert torch.equal(g.basis, h.basis)
    tokens = [(e.tokens, f.tokens) for e, f in zip(sub._entries, fresh._entries) if e.kind == "embedding"]
    assert tokens and all(torch.equal(a, b) for a, b in tokens)


def test_state_dict_without_the_moments_differs_and_version_1_still_loads():
    """Without the in-progress moments (a version-1 state) the next update() differs: the test above is not
    vacuous. Version-1 states load (bases kept, nothing in progress)."""
    model = tiny_llama()
    sub = _observed(model)
    state = sub.state_dict()
    v1 = dict(state, version=1, groups=[{k: v for k, v in gs.items() if k not in ("acc", "count")}
                                        for gs in state["groups"]])
    v1.pop("token_counts")
    old = ActivationSubspace(model, energy=0.9, contrast=0.5)
    old.load_state_dict(v1)
    assert all(torch.equal(g.basis, h.basis) for g, h in zip(sub._groups, old._groups))
    assert all(g.acc["safety"] is None and g.count["safety"] == 0.0 for g in old._groups)
    sub.update()
    with torch.no_grad(), old.observe():
        model(input_ids=CAP[:, :3])
    old.update()
    assert any(g.basis.shape != h.basis.shape or not torch.equal(g.basis, h.basis)
               for g, h in zip(sub._groups, old._groups))


def test_load_state_dict_refuses_bad_moments_before_changing_anything():
    model = tiny_llama()
    state = _observed(model).state_dict()
    gs = dict(state["groups"][0])
    gs["acc"] = {"safety": torch.zeros(3, 3, dtype=torch.float64), "capability": None}
    bad = dict(state, groups=[gs] + state["groups"][1:])
    target = ActivationSubspace(model, energy=0.7)
    with pytest.raises(ValueError, match=r"acc\['safety'\] has shape \(3, 3\)"):
        target.load_state_dict(bad)
    assert target.energy == 0.7 and target.updates == 0


# --- item 5: capability batches checked at attach()/from_loader, before anything runs -----------------------

def _hf():
    pytest.importorskip("datasets")
    import test_hf_integration as H

    return H


def _trainer(H, tok, tmp_path, model=None):
    from transformers import Trainer, TrainingArguments

    model = model or H.make_model(tok)
    return Trainer(model=model, args=TrainingArguments(**H.base_args(tmp_path)), train_dataset=H.lm_dataset(tok))


def _no_inputs(cap):
    return [{"attention_mask": b["attention_mask"], "text_ids": b["input_ids"], "labels": b["labels"]} for b in cap]


def _no_labels(cap):
    return [{k: v for k, v in b.items() if k != "labels"} for b in cap]


@pytest.mark.parametrize("wrap", ["list", "loader", "ema"])
def test_attach_refuses_capability_batches_without_the_models_inputs(tmp_path, wrap):
    from atax_kernels.integrations.hf import EMA, attach

    H = _hf()
    tok = H.make_tokenizer()
    bad = _no_inputs(H.capability_batches(tok, 2))
    ref = {"list": bad, "loader": torch.utils.data.DataLoader(bad, batch_size=None),
           "ema": EMA(bad, beta=0.5)}[wrap]
    trainer = _trainer(H, tok, tmp_path)
    step = trainer.training_step
    with pytest.raises(ValueError, match=r"capability loader.*first batch has keys \['attention_mask', 'labels', "
                                         r"'text_ids'\].*LlamaForCausalLM.forward needs one of \['input_ids', "
                                         r"'inputs_embeds'\]"):
        attach(trainer, reference=ref)
    assert trainer.training_step == step and getattr(trainer, "_atax_handle", None) is None


def test_attach_refuses_gradient_batches_without_labels(tmp_path):
    from atax_kernels.integrations.hf import CapabilitySource, attach

    H = _hf()
    tok = H.make_tokenizer()
    bad = _no_labels(H.capability_batches(tok, 2))
    trainer = _trainer(H, tok, tmp_path)
    with pytest.raises(ValueError, match=r"without labels: its first batch has keys \['attention_mask', "
                                         r"'input_ids'\].*\['labels'\].*CapabilitySource"):
        attach(trainer, reference=bad)
    with pytest.raises(TypeError, match="yields Tensor batches.*dicts"):
        attach(trainer, reference=[torch.zeros(2, 3, dtype=torch.long)])
    # a loss_fn of one's own: the batches are the caller's business
    h = attach(trainer, reference=CapabilitySource(bad, loss_fn=lambda m, b: m(**b, labels=b["input_ids"]).loss))
    h.detach()


def test_peeking_a_shuffled_loader_changes_no_rng_and_a_generator_is_checked_at_first_use(tmp_path):
    from atax_kernels._batches import NOT_PEEKABLE, peek_first
    from atax_kernels.integrations.hf import attach

    H = _hf()
    tok = H.make_tokenizer()
    cap = H.capability_batches(tok, 3)
    g = torch.Generator().manual_seed(1)
    loader = torch.utils.data.DataLoader(cap, batch_size=None, shuffle=True, generator=g)
    rng, gen = torch.get_rng_state(), g.get_state()
    assert isinstance(peek_first(loader), dict)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(g.get_state(), gen)
    one_shot = iter(_no_labels(cap))
    assert peek_first(one_shot) is NOT_PEEKABLE and len(list(one_shot)) == 3   # nothing consumed

    trainer = _trainer(H, tok, tmp_path)
    attach(trainer, reference=(b for b in _no_labels(cap)))   # cannot be peeked: accepted here...
    with pytest.raises(ValueError, match=r"without labels.*checked when the first batch was drawn: the loader is "
                                         r"not a list or a DataLoader, e.g. a one-shot iterator"):
        trainer.train()                                         # ...refused at its first batch, before its loss


def test_from_loader_refuses_batches_without_the_models_inputs():
    model = tiny_llama()
    bad = [{"attention_mask": torch.ones(1, 5, dtype=torch.long), "ids": CAP}]
    with pytest.raises(ValueError, match=r"from_loader: the capability loader.*first batch has keys "
                                         r"\['attention_mask', 'ids'\].*forward needs one of \['input_ids', "
                                         r"'inputs_embeds'\]"):
        ActivationSubspace.from_loader(model, bad)
    with pytest.raises(ValueError, match="from_loader.*first batch"):
        ActivationSubspace.from_loader(model, torch.utils.data.DataLoader(bad, batch_size=None))
    with pytest.raises(TypeError, match="one-shot"):   # still refused as before, nothing consumed to find out
        ActivationSubspace.from_loader(model, iter(bad))
    # labels are not needed here (no loss), and a forward= of one's own feeds any batch
    sub = ActivationSubspace.from_loader(model, [{"input_ids": CAP}], energy=0.9)
    assert sub.updates == 1
    sub = ActivationSubspace.from_loader(model, bad, forward=lambda m, b: m(input_ids=b["ids"]), energy=0.9)
    assert sub.updates == 1


# --- item 6: gradient-projection settings refused with an ActivationSubspace; the repr says what runs -------

@pytest.mark.parametrize("kw", [dict(mode="conflict"), dict(strength=0.5), dict(granularity="tensor"),
                                dict(log_tax_rate=True)])
def test_attach_activation_refuses_gradient_settings(tmp_path, kw):
    from atax_kernels.integrations.hf import attach

    H = _hf()
    tok = H.make_tokenizer()
    model = H.make_model(tok)
    sub = ActivationSubspace.from_loader(model, H.capability_batches(tok, 1), energy=0.99)
    trainer = _trainer(H, tok, tmp_path, model)
    key = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{key}=.*do not apply to activation projection.*energy="):
        attach(trainer, reference=sub, **kw)
    assert getattr(trainer, "_atax_handle", None) is None
    h = attach(trainer, reference=sub, refresh_every=10)
    r = repr(h)
    assert r.startswith(f"AtaxHandle(activation: energy=0.99, contrast=0, refresh_every=10, "
                        f"modules={len(sub._entries)}"), r
    assert "mode" not in r and "strength" not in r
    h.detach()


def test_projected_optimizer_activation_with_ptx_refuses_ignored_settings_and_repr_says_what_runs():
    from atax_kernels import ProjectedOptimizer

    model = tiny_llama()
    sub = ActivationSubspace.from_loader(model, [{"input_ids": CAP}], energy=0.99)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in (dict(mode="conflict"), dict(strength=0.5), dict(granularity="tensor")):
        key = next(iter(kw))
        # with PTX the captured references are added, never projected against: these would be ignored
        with pytest.raises(ValueError, match=rf"{key}=.*do not apply to activation projection"):
            ProjectedOptimizer(inner, activation_subspace=sub, ptx_weight=0.5, **kw)
    opt = ProjectedOptimizer(inner, activation_subspace=sub, ptx_weight=0.5)
    r = repr(opt)
    assert r.startswith(f"ProjectedOptimizer(activation: energy=0.99, contrast=0, modules={len(sub._entries)}, "
                        f"activation_target='grad', refresh_every=1; captured references added as PTX: "
                        f"ptx_weight=0.5;"), r
    assert "strength" not in r
    # without PTX, mode/strength still apply to the gradient references (capture_reference(), subspace=)
    opt = ProjectedOptimizer(inner, activation_subspace=sub, strength=0.5)
    assert "activation: energy=0.99" in repr(opt) and "gradient references: mode='orthogonal', strength=0.5" \
        in repr(opt)
    assert repr(ProjectedOptimizer(inner)).startswith("ProjectedOptimizer(mode='orthogonal', strength=1.0")

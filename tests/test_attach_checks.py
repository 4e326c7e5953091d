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

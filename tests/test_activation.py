"""ActivationSubspace: the guarantee (dW x = 0 on the observed span), bases against a float64 oracle,
shared-input detection, LoRA, Conv1D, embeddings, contrast, decay, bad input, state and memory.

Tiny float64 models, so the bounds are crisp: inputs are observed from a few tokens (rank < d_in), so each
weight keeps free directions and the projected update is not trivially zero.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atax_kernels import ActivationSubspace, ProjectedOptimizer

transformers = pytest.importorskip("transformers")

TOL = 1e-9  # ||dW x|| <= TOL ||dW|| ||x|| in float64


def tiny_llama(seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


CAP_IDS = torch.tensor([[1, 2, 3, 4]])          # 4 positions: every layer input has rank <= 4 < d_in
SAFE_IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def record_inputs(model: nn.Module, names: list[str]):
    """Forward pre-hooks that keep each named module's inputs (the test's own record, independent of the
    library's accumulators)."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: store[n].append(a[0].detach().clone())) for n in names]
    return store, hs


def safety_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=SAFE_IDS).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), SAFE_IDS.roll(1, 1).reshape(-1)).backward()
    opt.step()


def dense_weights(sub: ActivationSubspace, model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    from transformers.pytorch_utils import Conv1D

    mods = dict(model.named_modules())
    return {n: (mods[n], isinstance(mods[n], Conv1D)) for n in sub.ranks()
            if isinstance(mods[n], (nn.Linear, Conv1D))}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_one_step_keeps_observed_inputs_and_logits(make):
    """After one projected AdamW step: ||dW x|| <= TOL ||dW|| ||x|| for every protected weight and every
    observed input x, dW != 0, and the logits on the observed prompt move >= 1e6x less than a plain step."""
    model = make()
    plain = copy.deepcopy(model)
    sub = ActivationSubspace(model, energy=1.0, norms="freeze", biases="freeze", basis_dtype=torch.float64)
    dense = dense_weights(sub, model)
    store, hs = record_inputs(model, list(dense))
    with torch.no_grad(), sub.observe():
        before = model(input_ids=CAP_IDS).logits
    for h in hs:
        h.remove()
    sub.update()
    old = {n: (m.weight.t() if t else m.weight).detach().clone() for n, (m, t) in dense.items()}
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                             activation_subspace=sub, target="update")
    safety_step(model, opt)
    safety_step(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1))
    moved = 0
    for n, (m, t) in dense.items():
        dw = (m.weight.t() if t else m.weight).detach() - old[n]
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in store[n]])
        bound = TOL * dw.norm() * xs.norm(dim=1) + 1e-300
        assert ((dw @ xs.t()).norm(dim=0) <= bound).all(), n
        moved += int(dw.norm() > 0)
    assert moved >= len(dense) // 2  # the free directions did train
    with torch.no_grad():
        drift = (model(input_ids=CAP_IDS).logits - before).abs().max()
        drift_plain = (plain(input_ids=CAP_IDS).logits - before).abs().max()
    assert drift_plain > 1e-3
    assert drift <= 1e-6 * drift_plain, (float(drift), float(drift_plain))


def test_shared_inputs_found_at_run_time():
    """q/k/v share the normed hidden state, gate/up too; o_proj, down_proj and lm_head do not."""
    model = tiny_llama()
    sub = ActivationSubspace(model)
    with torch.no_grad(), sub.observe():
        model(input_ids=CAP_IDS)
    groups = {tuple(g) for g in sub.groups()}
    for layer in range(2):
        p = f"model.layers.{layer}."
        assert tuple(p + f"self_attn.{x}_proj" for x in "qkv") in groups
        assert (p + "mlp.gate_proj", p + "mlp.up_proj") in groups
        assert (p + "self_attn.o_proj",) in groups
        assert (p + "mlp.down_proj",) in groups
    assert ("lm_head",) in groups
    assert len(groups) == 2 * 4 + 1
    sub.update()
    r = sub.ranks()
    assert r["model.layers.0.self_attn.q_proj"] == r["model.layers.0.self_attn.v_proj"] == 4


class _Reuse(nn.Module):
    """l1 and l2 read different tensors; the first is freed before the second is made, so the allocator
    tends to hand the second the same address and shape."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 4).double(), nn.Linear(64, 4).double()

    def forward(self, x):
        t = x * 1.0
        a = self.l1(t)
        del t
        t = x * 2.0
        return a + self.l2(t)


def test_shared_detection_ignores_reused_addresses():
    """Two modules fed different tensors that happen to reuse one freed address are not merged."""
    model = _Reuse()
    ptrs = []
    hs = [m.register_forward_pre_hook(lambda m, a: ptrs.append(a[0].data_ptr())) for m in (model.l1, model.l2)]
    sub = ActivationSubspace(model)
    with torch.no_grad(), sub.observe():
        model(torch.randn(32, 64, dtype=torch.float64))
    for h in hs:
        h.remove()
    if ptrs[0] != ptrs[1]:
        pytest.skip("the allocator did not reuse the address here")
    assert len(sub.groups()) == 2


@pytest.mark.parametrize("energy", [0.0, 1.0])
def test_energy_extremes(energy):
    """energy 0: the wrapped step is bit-identical to a plain one; energy 1 with full-rank inputs: every
    protected weight keeps its value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    plain = copy.deepcopy(model)
    sub = ActivationSubspace(model, energy=energy, basis_dtype=torch.float64)
    with torch.no_grad(), sub.observe():
        model(torch.randn(50, 6, dtype=torch.float64))
    sub.update()
    assert all(r == (0 if energy == 0 else d) for r, d in zip(sub.ranks().values(), (6, 5)))
    old = [p.detach().clone() for p in model.parameters()]
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=sub)
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    x = torch.randn(7, 6, dtype=torch.float64)
    for m, o in ((model, opt), (plain, popt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for p, q, o in zip(model.parameters(), plain.parameters(), old):
        if energy == 0:
            assert torch.equal(p, q)
        else:
            assert (p - o).abs().max() <= 1e-12 * o.abs().max()
            assert (q - o).abs().max() > 1e-4
    frac = float(opt.last_stats.update_removed_fraction)
    assert frac == (0.0 if energy == 0 else pytest.approx(1.0, abs=1e-9))


def oracle_basis(xs: np.ndarray, energy: float) -> np.ndarray:
    c = xs.T @ xs / xs.shape[0]
    w, v = np.linalg.eigh(c)
    w, v = w[::-1], v[:, ::-1]
    k = int(np.searchsorted(np.cumsum(w) / w.sum(), energy - 1e-12) + 1)
    return v[:, :k]


def projector(u: np.ndarray) -> np.ndarray:
    return u @ u.T


@pytest.mark.parametrize("weighting", ["token", "energy"])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_basis_matches_float64_eigh_oracle(energy, weighting):
    torch.manual_seed(1)
    scales = torch.logspace(0, -3, 12, dtype=torch.float64)
    xs = torch.randn(400, 12, dtype=torch.float64) * scales
    xs[::40] *= 1e3  # outlier positions: weighting="token" counts them by direction only
    model = nn.Linear(12, 3).double()
    sub = ActivationSubspace(model, energy=energy, weighting=weighting)
    with torch.no_grad(), sub.observe():
        model(xs[:150])
        model(xs[150:])  # two forwards: streaming sums
    sub.update()
    u = sub._groups[0].basis.double().numpy()
    x = xs.numpy()
    ref = oracle_basis(x / np.linalg.norm(x, axis=1, keepdims=True) if weighting == "token" else x, energy)
    assert u.shape == ref.shape
    assert np.abs(u.T @ u - np.eye(u.shape[1])).max() < 1e-6  # float32 basis
    assert np.abs(projector(u) - projector(ref)).max() < 1e-6


def test_max_rank_caps():
    model = nn.Linear(10, 2).double()
    sub = ActivationSubspace(model, energy=1.0, max_rank=3)
    with torch.no_grad(), sub.observe():
        model(torch.randn(40, 10, dtype=torch.float64))
    sub.update()
    assert sub.ranks() == {"": 3}


def test_subspace_iteration_agrees_with_full_eigh():
    """Above EIGH_MAX_DIM the basis comes from warm-started subspace iteration: same span as eigh, cold and
    warm (second update from the previous basis, on drifted data)."""
    torch.manual_seed(2)
    d = 96
    mix = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    spec = torch.cat([torch.logspace(1, -1, 10, dtype=torch.float64), torch.full((d - 10,), 1e-4, dtype=torch.float64)])
    def data(n, drift):
        m = mix + drift * torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        return (torch.randn(n, d, dtype=torch.float64) * spec.sqrt()) @ m.t()
    full = ActivationSubspace(nn.Linear(d, 2).double(), energy=0.99)
    it = ActivationSubspace(nn.Linear(d, 2).double(), energy=0.99)
    it.EIGH_MAX_DIM = 16
    for drift in (0.0, 0.02):
        xs = data(600, drift)
        for s in (full, it):
            with torch.no_grad(), s.observe():
                s.model(xs)
            s.update()
        a, b = full._groups[0].basis.double(), it._groups[0].basis.double()
        assert a.shape == b.shape and a.shape[1] >= 5
        assert (a @ a.t() - b @ b.t()).abs().max() < 1e-5


def test_contrast_leaves_directions_both_sides_use():
    """C_cap = diag(1, 1, 0), C_safety = diag(0, 1, 1): at beta = 1 only e0 is protected; at beta = 0 e0, e1."""
    e = torch.eye(3, dtype=torch.float64)
    cap = torch.cat([e[0:1], e[1:2]]) * 2.0
    safe = torch.cat([e[1:2], e[2:3]]) * 2.0
    for beta, want in ((1.0, [0]), (0.0, [0, 1])):
        model = nn.Linear(3, 2).double()
        sub = ActivationSubspace(model, energy=1.0, contrast=beta)
        with torch.no_grad(), sub.observe():
            model(cap)
        if beta:
            with torch.no_grad(), sub.observe(side="safety"):
                model(safe)
        sub.update()
        u = sub._groups[0].basis.double()
        assert torch.allclose(u @ u.t(), e[want].t() @ e[want], atol=1e-7), (beta, u)


def test_decay_keeps_an_average():
    e = torch.eye(4, dtype=torch.float64)
    model = nn.Linear(4, 2).double()
    sub = ActivationSubspace(model, energy=1.0)
    for rows, decay in ((e[0:1], 0.5), (e[1:2], 0.5)):
        with torch.no_grad(), sub.observe():
            model(rows)
        sub.update(decay=decay)
    u = sub._groups[0].basis.double()
    assert torch.allclose(u @ u.t(), e[:2].t() @ e[:2], atol=1e-7)
    with torch.no_grad(), sub.observe():
        model(e[2:3])
    sub.update()  # decay 0 after an average: only what was observed since
    u = sub._groups[0].basis.double()
    assert torch.allclose(u @ u.t(), e[2:3].t() @ e[2:3], atol=1e-7)


def test_nothing_observed_keeps_previous_basis():
    model = nn.Linear(4, 2).double()
    sub = ActivationSubspace(model, energy=1.0)
    with torch.no_grad(), sub.observe():
        model(torch.eye(4, dtype=torch.float64)[:2])
    sub.update()
    u = sub._groups[0].basis.clone()
    sub.update()
    assert torch.equal(sub._groups[0].basis, u)


def test_attention_mask_excludes_padding():
    torch.manual_seed(4)
    model = nn.Linear(5, 2).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    x_pad = x.clone()
    x_pad[mask == 0] = 1e3 * torch.randn(3, 5, dtype=torch.float64)
    a = ActivationSubspace(model, energy=0.9)
    with torch.no_grad(), a.observe(attention_mask=mask):
        model(x_pad)
    a.update()
    b = ActivationSubspace(model, energy=0.9)
    with torch.no_grad(), b.observe():
        model(x[mask == 1])
    b.update()
    ua, ub = a._groups[0].basis.double(), b._groups[0].basis.double()
    assert ua.shape == ub.shape and torch.allclose(ua @ ua.t(), ub @ ub.t(), atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask"):
        with torch.no_grad(), a.observe(attention_mask=torch.ones(4, 4)):
            model(x)


def test_nonfinite_batch_not_folded_in():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    good = torch.randn(6, 4, dtype=torch.float64)
    bad = good.clone()
    bad[2, 1] = float("inf")
    sub = ActivationSubspace(model, energy=0.95)
    with torch.no_grad(), sub.observe():
        model(good)
        model(bad)
    sub.update()
    assert sub.skipped_batches == 1
    assert "non-finite" in sub.last_skip_reason and "'0'" in sub.last_skip_reason
    ref = ActivationSubspace(model, energy=0.95)
    with torch.no_grad(), ref.observe():
        model(good)
    ref.update()
    for g, h in zip(sub._groups, ref._groups):
        assert torch.equal(g.basis, h.basis)


def test_embedding_rows_of_used_tokens_stay():
    """Tokens the capability prompt uses keep their rows exactly; rows only safety uses do train."""
    model = tiny_llama()
    sub = ActivationSubspace(model, energy=0.99)
    with torch.no_grad(), sub.observe():
        model(input_ids=CAP_IDS)
    sub.update()
    assert sub.ranks()["model.embed_tokens"] == 4
    emb = model.model.embed_tokens.weight
    old = emb.detach().clone()
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                             activation_subspace=sub)
    safety_step(model, opt)
    used = CAP_IDS.flatten()
    assert torch.equal(emb[used], old[used])
    assert (emb[5:17] - old[5:17]).abs().amax(1).min() > 0


def test_lora_update_keeps_BAx_on_the_span():
    """PEFT LoRA on q/v: the adapter's contribution B A x does not move for observed inputs x, while the
    adapters still train; lora_A/lora_B are not protected as separate Linears."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    cfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.2,
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    model.train()  # LoRA dropout active: the layer's clean input is what is observed
    sub = ActivationSubspace(model, energy=1.0, basis_dtype=torch.float64)
    names = [n for n in sub.ranks() if n.endswith(("q_proj", "v_proj"))]
    assert names and not any(".lora_A" in n or ".lora_B." in n for n in sub.ranks())
    assert all(sub.ranks()[n + ".lora_B"] == 0 for n in names)  # B's factor listed: free under lora="input"
    assert not any(n.endswith("k_proj") for n in sub.ranks())  # base weights frozen: not protected
    store, hs = record_inputs(model, names)
    with torch.no_grad(), sub.observe():
        model(input_ids=CAP_IDS[:, :2])  # rank 2 inputs < r = 6: B keeps free directions
    for h in hs:
        h.remove()
    sub.update()
    mods = dict(model.named_modules())

    def delta(n):
        m = mods[n]
        return (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().clone()

    old = {n: delta(n) for n in names}
    old_a = {n: mods[n].lora_A["default"].weight.detach().clone() for n in names}
    opt = ProjectedOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                             activation_subspace=sub)
    safety_step(model, opt)
    for n in names:
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in store[n]])
        d = delta(n) - old[n]
        assert d.norm() > 1e-6
        assert (mods[n].lora_A["default"].weight - old_a[n]).norm() > 1e-6
        assert ((d @ xs.t()).norm(dim=0) <= 1e-9 * old[n].norm() * xs.norm(dim=1)).all(), n


def test_bad_input_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Conv2d(1, 1, 1))
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    with pytest.raises(TypeError, match="not supported"):
        ActivationSubspace(model, modules=[model[2]])
    with pytest.raises(TypeError, match="not supported"):
        ActivationSubspace(model, modules=["1"])
    with pytest.raises(ValueError, match="not a submodule"):
        ActivationSubspace(model, modules=[nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="not a module name"):
        ActivationSubspace(model, modules=["nope"])
    for bad in (1.5, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="energy"):
            ActivationSubspace(model, energy=bad)
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="contrast"):
            ActivationSubspace(model, contrast=bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_rank"):
            ActivationSubspace(model, max_rank=bad)
    with pytest.raises(TypeError, match="basis_dtype"):
        ActivationSubspace(model, basis_dtype=torch.int32)
    with pytest.raises(ValueError, match="norms"):
        ActivationSubspace(model, norms="protect")
    with pytest.raises(TypeError, match="nn.Module"):
        ActivationSubspace("model")
    with pytest.raises(ValueError, match="no trainable"):
        ActivationSubspace(nn.Sequential(nn.ReLU()))
    sub = ActivationSubspace(model, modules=[model[0]])
    with pytest.raises(ValueError, match="side"):
        with sub.observe(side="reward"):
            pass
    with pytest.raises(ValueError, match="contrast > 0"):
        with sub.observe(side="safety"):
            pass
    assert hooks() == 0
    with pytest.raises(ValueError, match="decay"):
        sub.update(decay=1.0)
    with pytest.raises(TypeError, match="ActivationSubspace"):
        ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=object())
    tied = nn.Linear(3, 3)
    twin = nn.Sequential(tied, nn.Linear(3, 3))
    twin[1].weight = tied.weight
    with pytest.raises(ValueError, match="same parameter"):
        ActivationSubspace(twin)


def test_state_dict_round_trip():
    model = tiny_llama()
    sub = ActivationSubspace(model, energy=0.9)
    with torch.no_grad(), sub.observe():
        model(input_ids=SAFE_IDS)
    sub.update(decay=0.5)
    state = sub.state_dict()
    fresh = ActivationSubspace(model, energy=0.5)
    fresh.load_state_dict(state)
    assert fresh.ranks() == sub.ranks() and fresh.groups() == sub.groups() and fresh.energy == 0.9
    for g, h in zip(sub._groups, fresh._groups):
        assert torch.equal(g.basis, h.basis) and torch.equal(g.ema["capability"], h.ema["capability"])
    assert fresh.memory_bytes() == sub.memory_bytes()
    other = ActivationSubspace(tiny_gpt2())
    with pytest.raises(ValueError, match="does not"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict"):
        fresh.load_state_dict({"groups": []})


def test_memory_bytes_is_sum_of_bases():
    model = tiny_llama()
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for dtype in (torch.float32, torch.bfloat16):
        sub = ActivationSubspace(model, energy=0.9, modules=dense, basis_dtype=dtype)
        with torch.no_grad(), sub.observe():
            model(input_ids=SAFE_IDS)
        sub.update()
        want = sum(g.d_in * g.basis.shape[1] for g in sub._groups) * torch.tensor([], dtype=dtype).element_size()
        assert sub.memory_bytes() == want > 0
        assert all(g.acc["capability"] is None for g in sub._groups)  # accumulators freed after update


@pytest.mark.parametrize("setting", ["freeze", "free"])
def test_biases_and_norms_frozen_by_default_free_on_request(setting):
    """GPT-2: LayerNorm weights/biases and Conv1D biases keep their values by default ("freeze") and train
    with "free"; the ActivationSubspace default is "freeze"."""
    model = tiny_gpt2()
    kw = {} if setting == "freeze" else dict(biases="free", norms="free")
    sub = ActivationSubspace(model, **kw)
    assert (sub.biases, sub.norms) == (setting, setting)
    with torch.no_grad(), sub.observe():
        model(input_ids=CAP_IDS)
    sub.update()
    watched = {"ln_f.weight": model.transformer.ln_f.weight, "ln_1.bias": model.transformer.h[0].ln_1.bias,
               "c_attn.bias": model.transformer.h[0].attn.c_attn.bias, "c_fc.bias": model.transformer.h[1].mlp.c_fc.bias}
    old = {k: v.detach().clone() for k, v in watched.items()}
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                             activation_subspace=sub)
    safety_step(model, opt)
    for k, v in watched.items():
        assert torch.equal(v, old[k]) == (setting == "freeze"), k


# --- found in review -----------------------------------------------------------------------------

def test_gpt2_with_a_padding_mask_through_from_loader():
    """GPT-2's position embedding reads ids of shape [1, S] against a [B, S] mask: broadcast, not refused."""
    model = tiny_gpt2()
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10], [2, 3, 0, 0, 0, 0]])
    mask = (torch.arange(6)[None] < torch.tensor([[4], [6], [2]])).long()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    sub = ActivationSubspace.from_loader(model, batches, energy=1.0, basis_dtype=torch.float64)
    ranks = sub.ranks()
    # positions 0..5 are used by real tokens, token 0 only as padding here (masked)
    assert ranks["transformer.wpe"] == 6
    used = set(ids[mask.bool()].tolist())
    assert ranks["transformer.wte"] == len(used)
    # a dense layer's input: only the 12 unmasked positions, so its rank is at most 12 (< 3 * 6 = 18)
    assert 0 < ranks["transformer.h.0.attn.c_attn"] <= 12


def test_from_loader_keeps_max_batches_and_refuses_one_shot_iterators():
    model = tiny_llama()
    pulled = []

    class Loader:
        def __iter__(self):
            for i in range(10):
                pulled.append(i)
                yield torch.randint(0, 32, (2, 4))

    sub = ActivationSubspace.from_loader(model, Loader(), max_batches=2)
    assert len(pulled) == 2          # no batch pulled beyond the limit
    sub.refresh()
    assert len(pulled) == 4          # refresh() observes as many as from_loader did
    with pytest.raises(TypeError, match="one-shot iterator"):
        ActivationSubspace.from_loader(model, (torch.randint(0, 32, (2, 4)) for _ in range(3)))


def test_a_forward_that_raises_is_not_folded_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2, bias=False)).double()
    sub = ActivationSubspace(model, energy=1.0, basis_dtype=torch.float64)
    good = torch.zeros(5, 4, dtype=torch.float64)
    good[:, 0] = 1.0  # rank 1 input
    with torch.no_grad(), sub.observe():
        model(good)
    boom = model[2].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), sub.observe():
            model(torch.randn(5, 4, dtype=torch.float64))  # the first layer saw full-rank input, then it raised
    boom.remove()
    sub.update()
    assert sub.ranks()["0"] == 1


def test_energy_zero_freezes_nothing_even_with_freeze_defaults():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    sub = ActivationSubspace(model, energy=0.0)
    assert sub.parameters() == [model[0].weight, model[2].weight]


def test_an_error_inside_the_projection_leaves_the_plain_step_and_the_deltas_untouched(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 3, bias=False))
    plain = copy.deepcopy(model)
    sub = ActivationSubspace(model, energy=0.9)
    with torch.no_grad(), sub.observe():
        model(torch.tensor([[1, 2, 3]]))
    sub.update()
    import atax_kernels.ops as ops

    def fail(*a, **k):
        raise ValueError("op refused")

    monkeypatch.setattr(ops, "remove_span_", fail)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub)
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    x = torch.tensor([[1, 4, 5]])
    for m, o in ((model, opt), (plain, popt)):
        o.zero_grad()
        m(x).square().sum().backward()
    old = [p.detach().clone() for p in model.parameters()]
    popt.step()
    with pytest.raises(ValueError, match="op refused"):
        opt.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        # the plain step (to one rounding of old + (new - old)), not the old weights, not a half-projected one
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert any((p - o).abs().max() > 1e-3 for p, o in zip(model.parameters(), old))

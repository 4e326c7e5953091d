"""atax_kernels.interpolate.interpolate_: against torch.lerp, per-pattern alphas, CPU base, errors."""
import copy

import pytest
import torch

from atax_kernels.interpolate import interpolate_


def _models(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).to(device, dtype)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(torch.randn_like(p))
    base_state = {k: v.detach().clone().cpu() for k, v in base.state_dict().items()}  # base lives on CPU
    return aligned, base_state


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _expected(before, base_state, alphas):
    return {k: torch.lerp(base_state[k].to(v.device, v.dtype), v, alphas[k]) for k, v in before.items()}


def _check(model, expected, exact=()):
    for k, v in model.named_parameters():
        if k in exact:
            assert torch.equal(v.detach(), expected[k]), k
        else:
            torch.testing.assert_close(v.detach(), expected[k], msg=k)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("alpha", [0.3, 0.0, 1.0, 1.5, -0.25])
def test_global_alpha_matches_lerp(alpha, backend, device):
    model, base_state = _models(device)
    before = _snapshot(model)
    interpolate_(model, base_state, alpha, backend=backend)
    expected = _expected(before, base_state, {k: alpha for k in before})
    exact = tuple(before) if alpha in (0.0, 1.0) else ()
    _check(model, expected, exact)
    for p in model.parameters():  # still trainable leaves
        assert p.requires_grad and p.is_leaf and p.grad_fn is None


@pytest.mark.parametrize("backend", [None, "torch"])
def test_per_pattern_alpha(backend, device):
    model, base_state = _models(device)
    before = _snapshot(model)
    interpolate_(model, base_state, {"0.*": 0.0, "2.weight": 0.5}, backend=backend)
    alphas = {"0.weight": 0.0, "0.bias": 0.0, "2.weight": 0.5, "2.bias": 1.0}  # unmatched -> 1 (unchanged)
    _check(model, _expected(before, base_state, alphas), exact=("0.weight", "0.bias", "2.bias"))

    model, base_state = _models(device, seed=1)
    before = _snapshot(model)
    # "*" is the default wherever it appears; first match wins among the others
    interpolate_(model, base_state, {"*": 0.25, "*.weight": 0.75, "0.weight": 0.0}, backend=backend)
    alphas = {"0.weight": 0.75, "0.bias": 0.25, "2.weight": 0.75, "2.bias": 0.25}
    _check(model, _expected(before, base_state, alphas))


def test_alpha_one_needs_no_base_and_aliased_base_is_a_no_op(device):
    model, _ = _models(device)
    before = _snapshot(model)
    interpolate_(model, {}, 1.0)
    interpolate_(model, {}, {"0.*": 1.0})
    interpolate_(model, model.state_dict(), 0.3)  # base is the model itself (shared memory): θ stays θ
    interpolate_(model, model.state_dict(), 0.3, backend="torch")
    _check(model, before, exact=tuple(before))


def test_bf16_model_fp32_base_and_no_grad(device):
    model, base_state = _models(device, dtype=torch.bfloat16)
    before = _snapshot(model)
    with torch.no_grad():
        interpolate_(model, base_state, 0.4)
    expected = {k: (base_state[k].float().to(device) * 0.6 + v.float() * 0.4).bfloat16() for k, v in before.items()}
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], atol=1e-2, rtol=1e-2)


def _corrupt(base_state, **changes):
    out = dict(base_state)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "make_state, alpha, kwargs, exc, match",
    [
        (lambda s: {k: v for k, v in s.items() if k != "2.bias"}, 0.5, {}, KeyError, "2.bias"),
        (lambda s: _corrupt(s, **{"2.bias": torch.zeros(3)}), 0.5, {}, ValueError, r"2\.bias.*\(3,\).*\(2,\)"),
        (lambda s: _corrupt(s, **{"2.bias": torch.zeros(2, dtype=torch.long)}), 0.5, {}, TypeError, "2.bias"),
        (lambda s: _corrupt(s, **{"2.bias": [0.0, 0.0]}), 0.5, {}, TypeError, "2.bias"),
        (lambda s: s, float("nan"), {}, ValueError, "finite"),
        (lambda s: s, {"0.*": 0.5, "2.bias": float("inf")}, {}, ValueError, "finite"),
        (lambda s: s, {"0.*": 0.5, "2.biass": 0.1}, {}, ValueError, "2.biass"),
        (lambda s: s, {"0.*": 0.5, 3: 0.1}, {}, TypeError, "pattern"),
        (lambda s: s, True, {}, TypeError, "alpha"),
        (lambda s: s, 0.5, {"backend": "nope"}, ValueError, "nope"),
        (lambda s: list(s.values()), 0.5, {}, TypeError, "mapping"),
    ],
)
def test_errors_leave_model_unchanged(make_state, alpha, kwargs, exc, match, device):
    model, base_state = _models(device)
    before = _snapshot(model)
    with pytest.raises(exc, match=match):
        interpolate_(model, make_state(base_state), alpha, **kwargs)
    _check(model, before, exact=tuple(before))


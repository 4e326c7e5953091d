"""atax_kernels.objectives: tempered_loss and margin_loss vs hand computation, shapes, errors."""
import math

import pytest
import torch

from atax_kernels.objectives import margin_loss, tempered_loss


def _logits(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --- tempered_loss ---------------------------------------------------------------------------------

def test_tempered_hand_computed():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 1])
    T = 4.0
    expect = 0.0
    for row, lab in zip(z.tolist(), y.tolist()):
        s = [v / T for v in row]
        expect += -(s[lab] - math.log(sum(math.exp(v) for v in s)))
    expect /= 2
    assert tempered_loss(z, y, temperature=T).item() == pytest.approx(expect, rel=1e-6)


def test_tempered_t1_is_cross_entropy_and_default_is_30():
    z, y = _logits(7, 11), torch.arange(7) % 11
    ce = torch.nn.functional.cross_entropy(z, y)
    torch.testing.assert_close(tempered_loss(z, y, temperature=1.0), ce)
    torch.testing.assert_close(tempered_loss(z, y), torch.nn.functional.cross_entropy(z / 30.0, y))


def test_tempered_causal_shape_and_ignore_index_no_shift():
    z = _logits(2, 5, 9)
    y = torch.full((2, 5), -100)
    y[0, 4], y[1, 2] = 3, 8
    got = tempered_loss(z, y, temperature=10.0)
    # no shift: label [b, t] scores logits [b, t]
    expect = torch.nn.functional.cross_entropy(torch.stack([z[0, 4], z[1, 2]]) / 10.0, torch.tensor([3, 8]))
    torch.testing.assert_close(got, expect)
    y2 = torch.where(y == -100, torch.full_like(y, -1), y)
    torch.testing.assert_close(tempered_loss(z, y2, temperature=10.0, ignore_index=-1), expect)


def test_tempered_does_not_saturate():
    # A confidently right model: plain CE gradient ~ 0, tempered gradient stays usable.
    z = torch.zeros(1, 5)
    z[0, 2] = 25.0
    y = torch.tensor([2])
    a = z.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(a, y).backward()
    b = z.clone().requires_grad_(True)
    tempered_loss(b, y, temperature=30.0).backward()
    assert a.grad.abs().max() < 1e-9
    assert b.grad.abs().max() > 1e-3
    assert torch.isfinite(b.grad).all()


def test_tempered_all_ignored_is_zero_with_grad():
    z = _logits(3, 4).requires_grad_(True)
    loss = tempered_loss(z, torch.full((3,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("T", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_tempered_bad_temperature(T):
    with pytest.raises(ValueError, match="temperature"):
        tempered_loss(_logits(2, 3), torch.tensor([0, 1]), temperature=T)


def test_tempered_temperature_type():
    with pytest.raises(TypeError, match="temperature"):
        tempered_loss(_logits(2, 3), torch.tensor([0, 1]), temperature="30")


# --- margin_loss ------------------------------------------------------------------------------------

def test_margin_hand_computed_strongest_competitor():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 5.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    # per token: -(3 - 2.5), -(4 - 5), -(1 - 1)
    expect = (-0.5 + 1.0 + 0.0) / 3
    assert margin_loss(z, y).item() == pytest.approx(expect)


def test_margin_competitor_ids_excludes_label():
    z = torch.tensor([[3.0, 1.0, 2.5, 0.0], [0.0, 4.0, 5.0, -2.0]])
    y = torch.tensor([0, 2])
    # competitors {1, 2}: row0 rival max(1, 2.5) = 2.5; row1 label 2 excluded -> rival z[1] = 4
    expect = (-(3.0 - 2.5) + -(5.0 - 4.0)) / 2
    assert margin_loss(z, y, competitor_ids=[1, 2]).item() == pytest.approx(expect)
    assert margin_loss(z, y, competitor_ids=torch.tensor([1, 2])).item() == pytest.approx(expect)
    # a single named competitor: 3 (ignores stronger tokens)
    expect3 = (-(3.0 - 0.0) + -(5.0 - -2.0)) / 2
    assert margin_loss(z, y, competitor_ids=(3,)).item() == pytest.approx(expect3)


def test_margin_label_only_candidate_contributes_zero():
    z = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    y = torch.tensor([1, 0])
    # row0: label 1 is the only candidate -> 0; row1: -(0 - 4) = 4; mean over both tokens
    assert margin_loss(z, y, competitor_ids=[1]).item() == pytest.approx(2.0)
    zz = z.clone().requires_grad_(True)
    margin_loss(zz, y, competitor_ids=[1]).backward()
    assert torch.isfinite(zz.grad).all()
    assert torch.equal(zz.grad[0], torch.zeros(2))


def test_margin_causal_no_shift_and_ignore_index():
    z = _logits(2, 4, 6)
    y = torch.full((2, 4), -100)
    y[0, 3], y[1, 1] = 2, 5
    got = margin_loss(z, y)
    rows = torch.stack([z[0, 3], z[1, 1]])
    labs = torch.tensor([2, 5])
    flat = margin_loss(rows, labs)
    torch.testing.assert_close(got, flat)
    hand = 0.0
    for r, l in zip(rows, labs.tolist()):
        others = torch.cat([r[:l], r[l + 1:]])
        hand += -(r[l] - others.max()).item()
    assert got.item() == pytest.approx(hand / 2, rel=1e-6)
    y2 = torch.where(y == -100, torch.full_like(y, -7), y)
    torch.testing.assert_close(margin_loss(z, y2, ignore_index=-7), got)


def test_margin_gradient_is_plus_minus_one_and_non_saturating():
    z = torch.zeros(1, 5)
    z[0, 1] = 40.0
    z[0, 3] = 2.0
    z = z.requires_grad_(True)
    margin_loss(z, torch.tensor([1])).backward()
    expect = torch.zeros(1, 5)
    expect[0, 1], expect[0, 3] = -1.0, 1.0
    torch.testing.assert_close(z.grad, expect)


def test_margin_gradients_finite_bf16_and_large_logits():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z = (_logits(3, 6, 10, dtype=torch.float32) * 1e3).to(dtype).requires_grad_(True)
        y = torch.randint(0, 10, (3, 6), generator=torch.Generator().manual_seed(1))
        loss = margin_loss(z, y, competitor_ids=[0, 1, 2])
        assert loss.dtype == dtype
        loss.backward()
        assert torch.isfinite(z.grad.float()).all()
        z2 = z.detach().clone().requires_grad_(True)
        tempered_loss(z2, y).backward()
        assert torch.isfinite(z2.grad.float()).all()


def test_margin_all_ignored_is_zero_with_grad():
    z = _logits(2, 3, 4).requires_grad_(True)
    loss = margin_loss(z, torch.full((2, 3), -100), competitor_ids=[1])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# --- shared validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [margin_loss, tempered_loss])
def test_shape_mismatch_names_shapes(fn):
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5, 7\)"):
        fn(_logits(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        fn(_logits(7), torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        fn(_logits(1, 2, 3, 4), torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.parametrize("fn", [margin_loss, tempered_loss])
def test_type_errors(fn):
    with pytest.raises(TypeError, match="logits"):
        fn([[0.0, 1.0]], torch.tensor([0]))
    with pytest.raises(TypeError, match="logits"):
        fn(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(TypeError, match="labels"):
        fn(_logits(1, 2), torch.tensor([0.0]))
    with pytest.raises(TypeError, match="labels"):
        fn(_logits(1, 2), [0])


@pytest.mark.parametrize("fn", [margin_loss, tempered_loss])
def test_label_out_of_range(fn):
    with pytest.raises(ValueError, match="vocabulary"):
        fn(_logits(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="vocabulary"):
        fn(_logits(2, 3), torch.tensor([-5, 1]))


def test_margin_bad_competitors():
    z, y = _logits(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="empty"):
        margin_loss(z, y, competitor_ids=[])
    with pytest.raises(ValueError, match="vocabulary"):
        margin_loss(z, y, competitor_ids=[4])
    with pytest.raises(TypeError, match="competitor_ids"):
        margin_loss(z, y, competitor_ids=[1.5])
    with pytest.raises(TypeError, match="competitor_ids"):
        margin_loss(z, y, competitor_ids=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="competitor"):
        margin_loss(_logits(2, 1), torch.tensor([0, 0]))

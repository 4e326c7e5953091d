"""atax_kernels.tax: bootstrap tax, ECE, entropy, distinct-n and the principal-angle tax rate."""
import math

import numpy as np
import pytest
import torch

from atax_kernels.tax import (
    TaxRate,
    TaxReport,
    distinct_n,
    expected_calibration_error,
    mean_entropy,
    measure_alignment_tax,
    tax_rate,
)

SHAPES = [(2,), (1, 3), (1,)]  # R^6 split over three tensors


def split(v, device="cpu", dtype=torch.float64):
    """A flat vector as a list of tensors shaped like SHAPES (the function under test never sees it flat)."""
    v = torch.as_tensor(v, dtype=dtype)
    out, i = [], 0
    for s in SHAPES:
        k = math.prod(s)
        out.append(v[i:i + k].reshape(s).clone().to(device))
        i += k
    return out


def e(i, n=6):
    v = torch.zeros(n, dtype=torch.float64)
    v[i] = 1.0
    return v


# --- measure_alignment_tax -----------------------------------------------------------------------------

def _bernoulli_models(n, p_base, p_aligned, seed):
    rng = np.random.default_rng(seed)
    return {"base": rng.random(n) < p_base, "aligned": rng.random(n) < p_aligned}


def test_tax_ci_covers_true_tax_and_is_deterministic():
    scores = _bernoulli_models(2000, 0.9, 0.6, seed=1)
    evaluate = lambda m: scores[m].astype(float).tolist()  # noqa: E731
    r = measure_alignment_tax("base", "aligned", evaluate, seed=3)
    assert isinstance(r, TaxReport)
    assert r.n == 2000 and r.confidence == 0.95
    assert r.base_score == pytest.approx(scores["base"].mean())
    assert r.aligned_score == pytest.approx(scores["aligned"].mean())
    assert r.tax == pytest.approx(r.base_score - r.aligned_score)
    assert r.ci_low < 0.3 < r.ci_high
    assert r.ci_low < r.tax < r.ci_high
    sd = math.sqrt(0.9 * 0.1 / 2000 + 0.6 * 0.4 / 2000)
    assert r.ci_high - r.ci_low == pytest.approx(2 * 1.96 * sd, rel=0.2)
    assert measure_alignment_tax("base", "aligned", evaluate, seed=3) == r
    assert measure_alignment_tax("base", "aligned", evaluate, seed=4) != r
    text = str(r)
    assert "tax" in text and "95% CI" in text and "n=2000" in text


def test_tax_ci_coverage_over_repeated_experiments():
    hits = 0
    for k in range(40):
        scores = _bernoulli_models(300, 0.9, 0.6, seed=100 + k)
        r = measure_alignment_tax("base", "aligned", lambda m: scores[m], n_bootstrap=400, confidence=0.9, seed=k)
        hits += r.ci_low <= 0.3 <= r.ci_high
    assert hits >= 31  # nominal 36/40


def test_tax_paired_ci_uses_the_correlation():
    rng = np.random.default_rng(0)
    base = (rng.random(1000) < 0.8).astype(float)
    aligned = base.copy()
    aligned[rng.choice(1000, 50, replace=False)] = 0.0  # aligned = base with a few flips: small paired variance
    src = {"b": torch.tensor(base), "a": torch.tensor(aligned, dtype=torch.float32)}
    r = measure_alignment_tax("b", "a", src.__getitem__, n_bootstrap=2000)
    d = base - aligned
    assert r.tax == pytest.approx(d.mean())
    assert r.ci_high - r.ci_low == pytest.approx(2 * 1.96 * d.std() / math.sqrt(1000), rel=0.15)
    unpaired = 2 * 1.96 * math.sqrt(base.var() / 1000 + aligned.var() / 1000)
    assert r.ci_high - r.ci_low < 0.6 * unpaired


@pytest.mark.parametrize(
    "base, aligned, match",
    [
        ([1.0, 0.0], [1.0], "same examples"),
        ([], [], "no scores"),
        ([1.0, float("nan")], [1.0, 1.0], "non-finite"),
        ([1.0, 2.0], [1.0, float("inf")], "non-finite"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
        (["a", "b"], [1.0, 2.0], "float scores"),
    ],
)
def test_tax_validation(base, aligned, match):
    src = {"b": base, "a": aligned}
    with pytest.raises(ValueError, match=match):
        measure_alignment_tax("b", "a", src.__getitem__)


@pytest.mark.parametrize("kw", [{"n_bootstrap": 0}, {"n_bootstrap": 2.5}, {"confidence": 1.0},
                                {"confidence": 0.0}, {"confidence": True}])
def test_tax_bad_options(kw):
    with pytest.raises(ValueError):
        measure_alignment_tax("b", "a", lambda m: [1.0, 0.0], **kw)
    with pytest.raises(TypeError):
        measure_alignment_tax("b", "a", "not callable")


# --- expected_calibration_error ------------------------------------------------------------------------

PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0])


def test_ece_hand_computed():
    # 5 bins (lo, hi]: conf .9 -> bin 4 (acc 1): .1*1/4; .8,.7 -> bin 3 (acc .5, conf .75): .25*2/4;
    # .6 -> bin 2 (acc 0): .6*1/4.  Total .025 + .125 + .15 = .3
    assert expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(0.3, abs=1e-12)
    assert expected_calibration_error(PROBS.tolist(), LABELS.tolist(), n_bins=5) == pytest.approx(0.3, abs=1e-12)
    # one bin: |mean acc - mean conf| = |.5 - .75|
    assert expected_calibration_error(PROBS, LABELS, n_bins=1) == pytest.approx(0.25, abs=1e-12)


def test_ece_logits_detection_and_forcing():
    logits = PROBS.log() + 3.0  # not probabilities -> softmax recovers PROBS
    assert expected_calibration_error(logits, LABELS, n_bins=5) == pytest.approx(0.3, abs=1e-9)
    assert expected_calibration_error(logits, LABELS, n_bins=5, from_logits=True) == pytest.approx(0.3, abs=1e-9)
    # forcing logits on probabilities softmaxes them again (different answer)
    forced = expected_calibration_error(PROBS, LABELS, n_bins=5, from_logits=True)
    assert forced != pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        expected_calibration_error(logits, LABELS, from_logits=False)


def test_ece_perfectly_calibrated_is_zero_and_matches_naive():
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 7, (500,), generator=g)
    p = torch.softmax(logits, 1)
    conf, pred = p.max(1)
    naive = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if sel.any():
            acc = (pred[sel] == labels[sel]).double().mean()
            naive += abs(float(acc - conf[sel].mean())) * int(sel.sum()) / 500
    assert expected_calibration_error(logits, labels, 10) == pytest.approx(naive, abs=1e-12)
    assert expected_calibration_error(p.float(), labels, 10) == pytest.approx(naive, abs=1e-5)


def test_ece_validation():
    with pytest.raises(ValueError, match="outside"):
        expected_calibration_error(PROBS, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\[N\]"):
        expected_calibration_error(PROBS, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        expected_calibration_error(PROBS[0], LABELS)
    with pytest.raises(TypeError, match="integer"):
        expected_calibration_error(PROBS, LABELS.float())
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(PROBS, LABELS, n_bins=0)
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))


# --- mean_entropy --------------------------------------------------------------------------------------

def test_entropy_uniform_and_hand_computed():
    assert mean_entropy(torch.zeros(3, 4, 7)) == pytest.approx(math.log(7), rel=1e-6)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert mean_entropy(torch.tensor([0.0, math.log(3.0)])) == pytest.approx(h, rel=1e-6)
    assert mean_entropy(torch.tensor([[0.0, float("-inf")]])) == 0.0
    assert mean_entropy(torch.zeros(2, 5, dtype=torch.bfloat16)) == pytest.approx(math.log(5), rel=1e-6)


def test_entropy_mask():
    x = torch.zeros(2, 3, 4)
    x[1] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # near-deterministic positions
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert mean_entropy(x, mask=mask) == pytest.approx(math.log(4), rel=1e-6)
    both = mean_entropy(x, mask=torch.tensor([[True, False, False], [True, False, False]]))
    assert both == pytest.approx(math.log(4) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="mask has shape"):
        mean_entropy(x, mask=torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mean_entropy(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="no positions"):
        mean_entropy(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError):
        mean_entropy(torch.zeros(2, 3, dtype=torch.long))


# --- distinct_n ----------------------------------------------------------------------------------------

def test_distinct_n_known_sequences():
    seqs = [[1, 2, 3, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)
    assert distinct_n(seqs, 3) == 1.0
    assert distinct_n(seqs, 6) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n([[1, 2], [3, 4]], 2) == 1.0  # no n-gram crosses a sequence boundary
    assert distinct_n(torch.tensor([[5, 5, 5, 5], [5, 5, 6, 5]]), 2) == pytest.approx(3 / 6)
    assert distinct_n([1, 1, 2], 1) == pytest.approx(2 / 3)  # a flat list is one sequence
    with pytest.raises(ValueError):
        distinct_n(seqs, 0)
    with pytest.raises(TypeError):
        distinct_n(torch.zeros(2, 3), 1)


# --- tax_rate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("theta_deg", [0.0, 25.0, 60.0, 90.0])
def test_tax_rate_known_angles(theta_deg, device):
    t = math.radians(theta_deg)
    s = [split(e(0), device), split(e(1), device)]
    c = [split(math.cos(t) * e(0) + math.sin(t) * e(2), device), split(e(1), device)]
    r = tax_rate(s, c, backend="torch")
    assert isinstance(r, TaxRate)
    assert r.cosines.dtype == torch.float64
    torch.testing.assert_close(r.cosines, torch.tensor([1.0, math.cos(t)], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(r.angles_deg, torch.tensor([0.0, theta_deg], dtype=torch.float64), atol=1e-3, rtol=0)
    assert r.rate == pytest.approx((1 + math.cos(t) ** 2) / 2, abs=1e-6)  # gram: fp32 products
    assert (r.rank_safety, r.rank_capability) == (2, 2)
    assert "tax rate" in str(r)


def test_tax_rate_orthogonal_identical_and_non_orthonormal_bases(device):
    s = [split(e(0) + e(1), device), split(2 * e(1), device)]
    r = tax_rate(s, [split(3 * e(2) - e(3), device), split(e(3) + e(4), device)], backend="torch")
    torch.testing.assert_close(r.cosines, torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(r.angles_deg, torch.full((2,), 90.0, dtype=torch.float64), atol=1e-4, rtol=0)
    assert r.rate == pytest.approx(0.0, abs=1e-12)
    r = tax_rate(s, [split(e(0) - 5 * e(1), device), split(0.01 * e(0), device)], backend="torch")
    torch.testing.assert_close(r.cosines, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert r.rate == pytest.approx(1.0, abs=1e-6)


def test_tax_rate_rank_deficient_and_unequal_ranks(device):
    t = math.radians(40.0)
    u = math.cos(t) * e(0) + math.sin(t) * e(2)
    # duplicated / dependent / zero safety gradients: the span is still {e0, e1}
    s = [split(e(0), device), split(e(0), device), split(2 * e(0) + e(1), device), split(e(1), device),
         split(torch.zeros(6), device)]
    c = [split(u, device), split(-u, device), split(e(1), device), split(3 * e(1) + u, device)]
    r = tax_rate(s, c, backend="torch")
    assert (r.rank_safety, r.rank_capability) == (2, 2)
    torch.testing.assert_close(r.cosines, torch.tensor([1.0, math.cos(t)], dtype=torch.float64), atol=1e-6, rtol=0)
    # fp32 exact duplicates
    r32 = tax_rate([split(e(0), device, torch.float32)] * 3 + [split(e(1), device, torch.float32)],
                   [split(u, device, torch.float32), split(e(1), device, torch.float32)], backend="torch")
    torch.testing.assert_close(r32.cosines, torch.tensor([1.0, math.cos(t)], dtype=torch.float64), atol=1e-6, rtol=0)
    # rank(S)=3 > rank(C)=1: one cosine, rate divides by rank(S)
    r = tax_rate([split(e(0), device), split(e(1), device), split(e(3), device)], [split(u, device)],
                 backend="torch")
    assert r.cosines.shape == (1,)
    assert r.cosines[0].item() == pytest.approx(math.cos(t), abs=1e-6)
    assert r.rate == pytest.approx(math.cos(t) ** 2 / 3, abs=1e-6)
    # asymmetric: rank(S)=1 inside span(C)
    assert tax_rate([split(e(0), device)], [split(e(0) + e(1), device), split(e(1), device)],
                    backend="torch").rate == pytest.approx(1.0)


def test_tax_rate_matches_scipy_on_random_subspaces(device):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2)]  # 30 dims
    S = torch.randn(3, 30, generator=g, dtype=torch.float64)
    C = torch.randn(4, 30, generator=g, dtype=torch.float64) + 0.5 * torch.cat([S, S[:1]])

    def lists(M):
        out = []
        for v in M:
            parts, i = [], 0
            for sh in shapes:
                k = math.prod(sh)
                parts.append(v[i:i + k].reshape(sh).to(device))
                i += k
            out.append(parts)
        return out

    r = tax_rate(lists(S), lists(C), backend="torch")
    ref = np.sort(np.cos(scipy_linalg.subspace_angles(S.T.numpy(), C.T.numpy())))[::-1]
    np.testing.assert_allclose(r.cosines.cpu().numpy(), ref[:3], atol=1e-5)
    assert r.rate == pytest.approx(float((ref[:3] ** 2).sum() / 3), abs=1e-5)


def test_tax_rate_validation(device):
    a = split(e(0), device)
    with pytest.raises(ValueError, match="empty"):
        tax_rate([], [a], backend="torch")
    with pytest.raises(ValueError, match="empty"):
        tax_rate([a], [], backend="torch")
    with pytest.raises(ValueError, match="tensors"):
        tax_rate([a], [a[:2]], backend="torch")
    with pytest.raises(ValueError, match="shape"):
        tax_rate([a], [[a[0], a[1].reshape(3, 1), a[2]]], backend="torch")
    with pytest.raises(TypeError):
        tax_rate([a], [[a[0], None, a[2]]], backend="torch")
    with pytest.raises(TypeError, match="one gradient"):
        tax_rate(a, [a], backend="torch")
    with pytest.raises(TypeError, match="list of tensors"):
        tax_rate([a, a[0]], [a], backend="torch")
    with pytest.raises(TypeError, match="dtype"):
        tax_rate([a], [[t.long() for t in a]], backend="torch")
    with pytest.raises(ValueError, match="zero"):
        tax_rate([split(torch.zeros(6), device)], [a], backend="torch")
    with pytest.raises(ValueError, match="inf/NaN"):
        tax_rate([split(e(0) * float("inf"), device)], [a], backend="torch")
    with pytest.raises(ValueError, match="rtol"):
        tax_rate([a], [a], rtol=2.0, backend="torch")

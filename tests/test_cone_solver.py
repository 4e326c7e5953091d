"""The cone projection behind ``mode="conflict"`` with k >= 2 (issue 13, item 13).

``g' = g + R^T mu`` with ``mu = argmin_{mu >= 0} 1/2 mu^T G mu + mu^T b`` is the closest point to ``g`` with
``R g' >= 0``. The projected vector is unique even where ``mu`` is not (dependent references), so every test
compares ``g'`` itself, against ``scipy.optimize.nnls`` on the equivalent least-squares problem
``min_{mu >= 0} |R^T mu + g|`` built from the explicit vectors (never from the Gram the library sees), and
checks feasibility ``r_j . g' >= -tol |r_j| |g|`` directly.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

import atax_kernels
import oracle
from atax_kernels import _cone
from atax_kernels.projection import CONE_RTOL, _solve_coefs
from conftest import backends_under_test

BACKENDS = backends_under_test()
F64_EPS = float(np.finfo(np.float64).eps)
F32_EPS = float(np.finfo(np.float32).eps)

# The two fp32 reproducers from the issue: (g, R, x the independent QP solvers agree on to 1e-7).
REPRODUCERS = {
    "stalled-inner-loop": (
        [1.4884719848632812, -1.2481414079666138, -1.6192556619644165],
        [[-0.9270220994949341, -0.17764101922512054, 0.4445264935493469],
         [-0.45501425862312317, 2.1793785095214844, -0.8398420810699463],
         [-0.5042592287063599, -0.5775182247161865, 0.6871286034584045]],
        [-0.478449, -0.347866, -0.643492],
    ),
    "cycling-active-set": (
        [1.45731782913208, -0.14845344424247742, -0.264060378074646],
        [[-1.1169190406799316, -1.9350873231887817, 0.09028520435094833],
         [0.9556223154067993, -0.8092178106307983, 0.26270198822021484],
         [-1.2896132469177246, 0.09615232050418854, -0.2087179273366928]],
        [0.073100, -0.070907, -0.484333],
    ),
}


def oracle_solve(R: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Closest point to g with R x >= 0, by scipy's NNLS on the explicit vectors (unit rows, unit g).

    Also returns how well the answer is determined: ``kappa = sum(mu)`` (how much the multipliers of unit
    references cancel; ``|R^T mu| <= |g|``) and ``sigma``, the smallest singular value of the unit rows
    NNLS keeps active. A solver that meets the optimality conditions to a backward error
    ``beta`` (in cosines) is within ~``beta / sigma`` of the exact answer, and rounding the Gram's products
    costs ``~eps * kappa``.
    """
    gn = float(np.linalg.norm(g))
    if gn == 0.0:
        return np.zeros_like(g), 0.0, 1.0
    norms = np.linalg.norm(R, axis=1)
    keep = norms > 0
    if not keep.any():
        return g.copy(), 0.0, 1.0
    U = R[keep] / norms[keep, None]
    mu, _ = scipy.optimize.nnls(U.T, -g / gn, maxiter=50 * U.shape[0] + 100)
    active = mu > 0  # NNLS keeps its active rows linearly independent
    sigma = float(np.linalg.svd(U[active], compute_uv=False).min()) if active.any() else 1.0
    return gn * (g / gn + U.T @ mu), float(mu.sum()), sigma


def oracle_cone(R: np.ndarray, g: np.ndarray) -> np.ndarray:
    return oracle_solve(R, g)[0]


def worst_violation(R: np.ndarray, g: np.ndarray, x: np.ndarray) -> float:
    """max_j -(r_j . x) / (|r_j| |g|): how infeasible x is, relative to the vectors' norms (<= 0 is feasible)."""
    scale = np.linalg.norm(R, axis=1) * np.linalg.norm(g)
    ok = scale > 0
    if not ok.any():
        return 0.0
    return float(np.max(-(R[ok] @ x) / scale[ok]))


def random_problem(rng: np.random.Generator, *, extreme: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A small (R, g): k in 2..8, n in 1..6 (often k >= n), with dependent, zero and near-dependent rows.

    Dependent rows are built exactly (duplicates, power-of-two multiples, integer or dyadic low-rank
    products, power-of-two row scales): a dependence that rounding has broken is ill-posed for any solver
    that sees only the Gram. Two nearly opposite references leave a wedge of angle delta, and which side of
    the hyperplane it lies on is decided by delta's direction, i.e. by the last bits of R; the Gram holds
    delta only to ~eps/delta^2. So nearly dependent rows get delta >= 3e-5 (a nearly parallel row is nearly
    opposite to another row's exact negative). ``extreme`` adds those and scales over 24 decades of g and
    of the rows; without it every problem is exact in fp32.
    """
    n, k = int(rng.integers(1, 7)), int(rng.integers(2, 9))
    u = rng.random()
    if u < 0.15:  # integer entries: exact ties and exactly dependent subsets are common
        R = rng.integers(-2, 3, size=(k, n)).astype(np.float64)
    elif u < 0.35 and min(k, n) > 1:  # low rank, exactly: small integers times dyadics (or integers)
        r = int(rng.integers(1, min(k, n)))
        basis = rng.integers(-4096, 4097, size=(r, n)) / (4096.0 if extreme else 1024.0)
        R = rng.integers(-2, 3, size=(k, r)) @ (basis if extreme else np.round(basis * 4))
    else:
        R = rng.standard_normal((k, n))
    if not extreme:
        R = R.astype(np.float32).astype(np.float64)
    for j in range(1, k):
        u, i = rng.random(), int(rng.integers(0, j))
        if u < 0.12:
            R[j] = R[i]  # duplicate
        elif u < 0.24:
            R[j] = R[i] * float(rng.choice([-4.0, -2.0, -1.0, -0.5, 0.5, 2.0, 8.0]))  # collinear, exactly
        elif u < 0.32:
            R[j] = 0.0  # zero reference
        elif u < 0.40 and extreme:  # nearly dependent: parallel or opposite up to delta
            R[j] = (R[i] * float(rng.choice([-3.0, -1.0, 1.0, 3.0]))
                    + 10.0 ** rng.uniform(-4.5, -2) * np.linalg.norm(R[i]) * rng.standard_normal(n))
    decades = (40 if rng.random() < 0.3 else 10) if extreme else 10
    R *= 2.0 ** rng.integers(-decades, decades + 1, size=(k, 1))
    u = rng.random()
    if u < 0.2:  # in the polar cone: the answer is 0
        g = -(R.T @ rng.random(k))
    elif u < 0.5:  # a mix, so some references conflict and some do not
        g = rng.standard_normal(n) + R.T @ (rng.standard_normal(k) / np.maximum(np.linalg.norm(R, axis=1), 1e-300))
    elif u < 0.52:
        g = np.zeros(n)
    else:
        g = rng.standard_normal(n)
    g *= 10.0 ** rng.uniform(-12, 12) if extreme else 2.0 ** rng.integers(-10, 11)
    if not extreme:
        g = g.astype(np.float32).astype(np.float64)
    return R, g


def solve_batch(problems: list[tuple[np.ndarray, np.ndarray]], rtol: float = CONE_RTOL,
                with_rank: bool = False) -> list[np.ndarray]:
    """g' for each problem by the library's solve on (G, b, |g|^2) in float64, batched per k.

    ``with_rank``: pass each problem's length n as the solve's bound on rank(G), as ``project_`` does.
    """
    out: list[np.ndarray | None] = [None] * len(problems)
    by_k: dict[int, list[int]] = {}
    for idx, (R, _) in enumerate(problems):
        by_k.setdefault(R.shape[0], []).append(idx)
    for k, idxs in by_k.items():
        G = torch.tensor(np.stack([problems[i][0] @ problems[i][0].T for i in idxs]))
        b = torch.tensor(np.stack([problems[i][0] @ problems[i][1] for i in idxs]))
        gg = torch.tensor([float(problems[i][1] @ problems[i][1]) for i in idxs], dtype=torch.float64)
        ranks = [problems[i][0].shape[1] for i in idxs] if with_rank else None
        coefs = _solve_coefs(G, b, gg, "conflict", 1.0, cone_rtol=rtol, max_rank=ranks).numpy()
        for row, i in enumerate(idxs):
            R, g = problems[i]
            out[i] = g - R.T @ coefs[row]
    return out  # type: ignore[return-value]


def nearly_dependent(R: np.ndarray) -> bool:
    """Whether two rows are parallel or opposite up to an angle in (~1e-7, 1.4e-2), but not exactly."""
    norms = np.linalg.norm(R, axis=1)
    U = R[norms > 0] / norms[norms > 0, None]
    gap = 1.0 - np.abs(U @ U.T)[np.triu_indices(U.shape[0], 1)]
    return bool(((gap > 1e-13) & (gap < 1e-4)).any())


def sweep_failures(problems, xs, *, rtol: float, backward: float, eps: float = F64_EPS,
                   rounding: float = 1000.0) -> list[tuple[float, float, float, int]]:
    """(error, allowed, violation, index) of every x that is not the cone projection of its g.

    ``x`` must be feasible to ``beta = backward + rounding * eps * kappa`` (cosines; ``eps`` of the
    arithmetic that formed the Gram and applied the coefficients: multipliers summing to kappa cancel, and
    so do their rounding errors, only that well) and within ``rtol + beta / sigma`` (relative to |g|) of
    the oracle's answer; see :func:`oracle_solve`.
    """
    failures = []
    for i, ((R, g), x) in enumerate(zip(problems, xs)):
        want, kappa, sigma = oracle_solve(R, g)
        gn = float(np.linalg.norm(g))
        if gn == 0.0:
            if np.any(x != 0):
                failures.append((float(np.linalg.norm(x)), 0.0, 0.0, i))
            continue
        beta = backward + rounding * eps * kappa
        allowed = rtol + beta / sigma
        err = float(np.linalg.norm(x - want)) / gn
        viol = worst_violation(R, g, x)
        if not (err <= allowed and viol <= beta):
            failures.append((err, allowed, viol, i))
    return failures


def describe(failures, problems, total):
    failures = sorted(failures, reverse=True)
    lines = [f"{len(failures)} of {total} problems wrong"]
    for err, allowed, viol, i in failures[:3]:
        R, g = problems[i]
        lines.append(f"  #{i}: |x - oracle|/|g| = {err:.2e} (allowed {allowed:.1e}), violation {viol:.2e}, "
                     f"k={R.shape[0]} n={R.shape[1]}\n    R={R.tolist()}\n    g={g.tolist()}")
    return "\n".join(lines)


def test_oracle_is_feasible_and_optimal_on_a_known_answer():
    # Two opposite references leave only their common hyperplane; the third is satisfied there.
    R = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    x = oracle_cone(R, np.array([3.0, -2.0]))
    np.testing.assert_allclose(x, [0.0, 0.0], atol=1e-12)
    x = oracle_cone(R, np.array([3.0, 2.0]))
    np.testing.assert_allclose(x, [0.0, 2.0], atol=1e-12)


@pytest.mark.parametrize("case", sorted(REPRODUCERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_reproducers(backend, case, device):
    g, R, expected = REPRODUCERS[case]
    grad = torch.tensor(g, dtype=torch.float32, device=device)
    refs = [[torch.tensor(r, dtype=torch.float32, device=device)] for r in R]
    atax_kernels.project_([grad], refs, mode="conflict", backend=backend)
    x = grad.detach().cpu().double().numpy()
    R64, g64 = np.array(R), np.array(g)
    gn = float(np.linalg.norm(g64))
    assert np.abs(x - np.array(expected)).max() <= 1e-5 * gn, f"{backend}: x = {x.tolist()}, expected {expected}"
    assert worst_violation(R64, g64, x) <= 1e-6, f"{backend}: R x = {(R64 @ x).tolist()}"
    # The oracle in this file agrees with the issue's independent solvers.
    assert np.abs(oracle_cone(R64, g64) - np.array(expected)).max() <= 1e-6 * gn


# "exact": a tolerance for exact float64 Grams; "default": the one project_ uses (fp32-product Grams).
RTOLS = {"exact": 1e-10, "default": CONE_RTOL}


def test_solver_random_sweep_float64():
    """10 000 random small problems, solved on (G, b) in float64, against scipy NNLS on the vectors."""
    rng = np.random.default_rng(20261202)
    problems = [random_problem(rng) for _ in range(10_000)]
    xs = solve_batch(problems, RTOLS["exact"])
    failures = sweep_failures(problems, xs, rtol=1e-7, backward=10 * RTOLS["exact"])
    assert not failures, describe(failures, problems, len(problems))


def test_solver_random_sweep_float64_default_tolerance():
    """The same sweep with the tolerance project_ uses: feasible to it, and the exact answer unless two rows
    are nearly dependent.

    Conflicts below CONE_RTOL are left alone on purpose; between two rows at an angle delta that residue is
    amplified by up to 1/delta (delta >= 3e-5 here), so those problems get the feasibility check only.
    """
    rng = np.random.default_rng(20261202)
    problems = [random_problem(rng) for _ in range(10_000)]
    xs = solve_batch(problems, CONE_RTOL)
    beta = 2 * CONE_RTOL
    wrong = [(0.0, 0.0, v, i) for i, ((R, g), x) in enumerate(zip(problems, xs))
             if (v := worst_violation(R, g, x)) > beta]
    clean = [i for i, (R, _) in enumerate(problems) if not nearly_dependent(R)]
    assert len(clean) > 7000
    wrong += [f[:3] + (clean[f[3]],) for f in sweep_failures([problems[i] for i in clean], [xs[i] for i in clean],
                                                            rtol=1e-7, backward=beta)]
    assert not wrong, describe(wrong, problems, len(problems))


@pytest.mark.parametrize("which", sorted(RTOLS))
def test_solver_degenerate_families(which):
    """Hand-built degeneracies: all-zero, all-duplicate, opposite pairs, k >> n, no conflict at all."""
    e = np.eye(3)
    cases = [
        (np.zeros((4, 3)), np.array([1.0, -2.0, 3.0])),  # zero references: untouched
        (np.tile([[1.0, -1.0, 2.0]], (6, 1)), np.array([-1.0, 0.5, -3.0])),  # one direction six times
        (np.vstack([e, -e]), np.array([1.0, -2.0, 3.0])),  # the cone is {0}
        (np.vstack([e[:1], -e[:1], 2 * e[:1], -4 * e[:1]]), np.array([-5.0, 1.0, 2.0])),  # a hyperplane
        (np.array([[1.0], [2.0], [0.0], [-3.0], [1.0]]), np.array([2.0])),  # n = 1, both signs: x = 0
        (np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]]), np.array([4.0, 5.0])),  # no conflict: mu = 0
        (np.array([[1.0, 0.0], [1.0, 1e-9], [1.0, -1e-9]]), np.array([-1.0, 1.0])),  # near-collinear fan
    ]
    xs = solve_batch(cases, RTOLS[which])
    failures = sweep_failures(cases, xs, rtol=1e-9, backward=1e-9)
    assert not failures, describe(failures, cases, len(cases))
    np.testing.assert_array_equal(xs[0], cases[0][1])
    np.testing.assert_array_equal(xs[5], cases[5][1])


def test_solver_is_scale_free():
    """Scaling g and each reference by powers of two scales g' exactly the same way (no absolute cut-offs)."""
    rng = np.random.default_rng(7)
    problems = [random_problem(rng, extreme=False) for _ in range(200)]
    base = solve_batch(problems)
    for s_g, s_r in [(2.0 ** -60, 2.0 ** 40), (2.0 ** 70, 2.0 ** -50)]:
        scaled = [(R * s_r, g * s_g) for R, g in problems]
        for x0, x1, (_, g) in zip(base, solve_batch(scaled), problems):
            assert np.linalg.norm(x1 / s_g - x0) <= 1e-9 * max(np.linalg.norm(g), 1e-300)


def test_fallback_when_the_active_set_gives_up(monkeypatch):
    """If the active set stops at its iteration cap, coordinate descent (which cannot cycle) and a warm-started
    active-set polish still reach the exact answer; coordinate descent alone lowers the objective every sweep."""
    real = _cone._active_set
    calls = {"cold": 0}

    def capped(G, b, rtol, nu=None, **kw):
        if nu is None:  # the first, cold attempt: one iteration, reported as not converged
            calls["cold"] += 1
            return real(G, b, rtol, max_iter=1, **kw)[0], False
        return real(G, b, rtol, nu=nu, **kw)

    monkeypatch.setattr(_cone, "_active_set", capped)
    rng = np.random.default_rng(11)
    problems = [random_problem(rng) for _ in range(300)]
    xs = solve_batch(problems, RTOLS["exact"])
    assert calls["cold"] > 100
    failures = sweep_failures(problems, xs, rtol=1e-7, backward=10 * RTOLS["exact"])
    assert not failures, describe(failures, problems, len(problems))

    G = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    b = np.array([-0.5, -0.8, 0.1])
    objective = [0.0]
    nu = np.zeros(3)
    for _ in range(50):
        nu = _cone._coordinate_descent(G, b, nu, 1e-12, sweeps=1)
        objective.append(0.5 * nu @ G @ nu + nu @ b)
    assert all(later <= earlier + 1e-15 for earlier, later in zip(objective, objective[1:]))
    assert _cone._kkt_violation(G, b, nu) <= 1e-9


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu", "cuda")])
def test_project_random_sample_fp32(backend, device):
    """400 random fp32 problems through the full project_ path (Gram kernel, solve, combine kernel).

    Half as the issue found its failures (Gaussian, k >= n), half with the exact degeneracies of
    :func:`random_problem`. fp32 rounds the Gram's products and the combine's sums: that is ``eps``.
    """
    rng = np.random.default_rng(1234)
    failures, problems = [], []
    for t in range(400):
        if t % 2:
            R, g = random_problem(rng, extreme=False)
        else:
            n = int(rng.integers(1, 5))
            R = rng.standard_normal((int(rng.integers(max(2, n), 9)), n)).astype(np.float32).astype(np.float64)
            g = rng.standard_normal(n).astype(np.float32).astype(np.float64)
        grad = torch.tensor(g, dtype=torch.float32, device=device)
        refs = [[torch.tensor(r, dtype=torch.float32, device=device)] for r in R]
        atax_kernels.project_([grad], refs, mode="conflict", backend=backend)
        x = grad.cpu().double().numpy()
        problems.append((R, g))
        failures += [f[:3] + (len(problems) - 1,)
                     for f in sweep_failures([(R, g)], [x], rtol=1e-5, backward=2 * CONE_RTOL, eps=F32_EPS,
                                             rounding=100.0)]
    assert not failures, describe(failures, problems, len(problems))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_granularity_with_fewer_elements_than_references(backend, device):
    """granularity="tensor": one cone problem per tensor; a bias and a scalar have n < k = 5."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4,), (), (2, 3), (1,), (7,)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    refs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    refs[3][2].zero_()  # a zero reference in one tensor only
    refs[4] = [r.clone() for r in refs[1]]  # a duplicated reference everywhere
    refs[2][4].copy_(-refs[0][4])  # opposite references in one tensor
    expected = oracle.project(grads, refs, "conflict", 1.0, "tensor")
    before = [t.double().reshape(-1).numpy() for t in grads]
    grads = [t.to(device) for t in grads]
    refs = [[t.to(device) for t in r] for r in refs]
    atax_kernels.project_(grads, refs, mode="conflict", granularity="tensor", backend=backend)
    for i, (got, want) in enumerate(zip(grads, expected)):
        R = np.stack([r[i].detach().cpu().double().reshape(-1).numpy() for r in refs])
        x = got.detach().cpu().double().reshape(-1).numpy()
        err = float(np.linalg.norm(x - want.reshape(-1).numpy()))
        assert err <= 2e-5 * np.linalg.norm(before[i]), f"tensor {i}: |g' - oracle| = {err:.2e}"
        assert worst_violation(R, before[i], x) <= 2e-5, f"tensor {i}: R g' = {(R @ x).tolist()}"


# Issue 17 item 7: k > n in fp32. rank(G) <= n, so k - n eigen-directions of the Gram are exactly null and the
# fp32 products gave them ~1e-7 eigenvalues; solved with them, the active set picked nearly dependent references
# with multipliers ~85 (unit scale) that cancel, and the rounding moved g' by 5.7e-4 |g| (torch), 3.4e-4 (cpu).
K_GT_N_BOUND = 2e-5  # |g' - oracle| / |g|; the largest measured over 14 000 random problems was 6.1e-6


def k_gt_n_problem(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian R (k x n) and g with 1 <= n < k <= 8, exact in fp32."""
    n = int(rng.integers(1, 6))
    k = int(rng.integers(n + 1, 9))
    R = rng.standard_normal((k, n)).astype(np.float32).astype(np.float64)
    g = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    return R, g


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue17_conflict_k_greater_than_n_fp32(backend, device):
    """The issue's reproducer: n = 3, k = 6, fp32, global granularity; the exact answer is g' = 0."""
    rng = np.random.default_rng(1084)
    n, k = rng.integers(3, 5), rng.integers(3, 7)
    assert (n, k) == (3, 6)
    g = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    R = rng.standard_normal((k, n)).astype(np.float32).astype(np.float64)
    grad = torch.tensor(g, dtype=torch.float32, device=device)
    refs = [[torch.tensor(r, dtype=torch.float32, device=device)] for r in R]
    atax_kernels.project_([grad], refs, mode="conflict", backend=backend)
    x = grad.cpu().double().numpy()
    gn = float(np.linalg.norm(g))
    err = float(np.linalg.norm(x - oracle_cone(R, g))) / gn
    assert err <= 1e-5, f"{backend}: |g' - oracle| / |g| = {err:.2e}, g' = {x.tolist()}"
    assert worst_violation(R, g, x) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_conflict_k_greater_than_n_fp32_sweep(backend, device):
    """Random k > n problems in fp32 through project_, both granularities, within K_GT_N_BOUND of the oracle.

    Global: one call per problem. Tensor: one call per k, each tensor its own problem with its own n < k (the
    solve gets each tensor's length as its rank bound).
    """
    rng = np.random.default_rng(17_07)
    problems, xs = [], []
    for _ in range(120):
        R, g = k_gt_n_problem(rng)
        grad = torch.tensor(g, dtype=torch.float32, device=device)
        refs = [[torch.tensor(r, dtype=torch.float32, device=device)] for r in R]
        atax_kernels.project_([grad], refs, mode="conflict", backend=backend)
        problems.append((R, g))
        xs.append(grad.cpu().double().numpy())
    for k in range(2, 9):
        shapes = [int(rng.integers(1, k)) for _ in range(40)]
        Rs = [rng.standard_normal((k, n)).astype(np.float32).astype(np.float64) for n in shapes]
        gs = [rng.standard_normal(n).astype(np.float32).astype(np.float64) for n in shapes]
        grads = [torch.tensor(g, dtype=torch.float32, device=device) for g in gs]
        refs = [[torch.tensor(R[j], dtype=torch.float32, device=device) for R in Rs] for j in range(k)]
        atax_kernels.project_(grads, refs, mode="conflict", granularity="tensor", backend=backend)
        problems += list(zip(Rs, gs))
        xs += [t.cpu().double().numpy() for t in grads]
    failures = []
    for i, ((R, g), x) in enumerate(zip(problems, xs)):
        gn = float(np.linalg.norm(g))
        err = float(np.linalg.norm(x - oracle_cone(R, g))) / gn
        viol = worst_violation(R, g, x)
        if not (err <= K_GT_N_BOUND and viol <= 2 * CONE_RTOL):
            failures.append((err, K_GT_N_BOUND, viol, i))
    assert not failures, describe(failures, problems, len(problems))


def test_solver_with_rank_bound_float64_sweep():
    """The rank-bound path on exact float64 Grams (duplicates, zero rows, low rank, k >> n): still the exact
    answer, and the problems where it applies (k > n) are common in the sweep."""
    rng = np.random.default_rng(20261202)
    problems = [random_problem(rng) for _ in range(4000)]
    assert sum(R.shape[0] > R.shape[1] for R, _ in problems) > 1000
    xs = solve_batch(problems, RTOLS["exact"], with_rank=True)
    failures = sweep_failures(problems, xs, rtol=1e-7, backward=10 * RTOLS["exact"])
    assert not failures, describe(failures, problems, len(problems))

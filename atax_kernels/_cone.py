"""The cone projection's tiny solve, stated in the Gram alone (``mode="conflict"``, k >= 2).

With ``G = R R^T`` and ``b = R g``, ``mu = argmin_{mu >= 0} 1/2 mu^T G mu + mu^T b`` gives
``g' = g + R^T mu``, the closest point to ``g`` with ``R g' >= 0``. The vectors are huge and only their
Gram reaches the solver, so everything below is phrased in G and b: ``(G mu + b)_j = r_j . g'`` is
reference j's dot with the projected gradient. ``g'`` is unique; ``mu`` is not when references are
dependent, and any minimiser serves, because ``R^T mu`` is the same vector for all of them.

How the answer is made trustworthy:

1. Scale-free coordinates. Each problem is rescaled to unit references and a unit gradient, so every
   tolerance reads as "a cosine" and nothing depends on how large the vectors are. Zero references drop
   out (``mu_j = 0``): they constrain nothing.
2. Lawson–Hanson active set on the Gram. A reference joins only while its dot with the current ``g'`` is
   below ``-rtol``; an entering reference that the least-squares step would not keep positive is refused
   (rounding has made it dependent on the active ones; letting it in gives the zero-length steps that
   cycle), and the blocking reference of every interpolation step leaves the active set explicitly
   (rounding can leave it at 1e-16 instead of 0). Sub-problems are solved by SVD least squares, so an
   exactly dependent active set gets the minimum-norm solution instead of an error. Conflicts below
   ``rtol`` but above ``CONE_FINE_RTOL`` are resolved too when the reference is independent of the active
   ones to the Gram's precision (accuracy for well-conditioned problems; never chasing rounding).
3. The KKT conditions are checked on the result, not assumed: ``mu >= 0``, ``G mu + b >= -tol`` and
   ``|G mu + b|_j <= tol`` wherever ``mu_j > 0`` (these bound ``|g' - g'_exact|^2`` by
   ``sum_j mu_j (G mu + b)_j``).
4. If the active set hits its iteration cap or fails the check, a method that cannot cycle takes over:
   cyclic projected coordinate descent, which lowers the objective at every step; its support then seeds
   a second active-set pass. The candidate with the smallest KKT violation is returned.
5. More references than elements (k > n, e.g. a bias with tensor granularity): then ``rank(G) <= n``, so the
   ``k - n`` weakest eigen-directions of the Gram are exactly null in truth and rounding alone gave them
   their (~1e-7) eigenvalues. Left in, they act like phantom dimensions of size ~sqrt(1e-7): the multipliers
   are then not unique, Lawson–Hanson returns a vertex whose active references can be nearly dependent
   (multipliers ~100 that cancel), and the Gram's rounding, amplified by that cancellation, moved ``g'`` by up
   to ~1e-2 |g| (issue 17). They are removed before the solve when the caller passes ``max_rank`` (see
   :func:`_drop_null_directions`), and the coefficients returned are the minimum-norm ones on what is kept.
"""
from __future__ import annotations

import numpy as np

#: A reference counts as conflicting while ``r_j . g' < -CONE_RTOL |r_j| |g|``. The Gram's entries carry the
#: rounding of fp32 products (relative ~1e-7 of ``|r_i| |r_j|``), so smaller conflicts are noise, and chasing
#: them steers ``g'`` along directions that exist only in the rounding: two nearly dependent references then
#: get large coefficients of opposite sign, which the fp32 combine pass cannot cancel. A 10x margin over the
#: noise; callers with exact float64 Grams can pass a smaller ``rtol``.
CONE_RTOL = 1e-6

#: Conflicts between this and ``CONE_RTOL`` are resolved too, but only by a reference that is independent of
#: the active ones to the Gram's precision: its squared sine to their span (the Schur complement of the unit
#: Gram) is at least ``CONE_DEP_TOL``. Well-conditioned problems so come out accurate to ~1e-9 / sigma instead
#: of ~1e-6 / sigma, and rounding noise never recruits a reference.
CONE_FINE_RTOL = 1e-9
CONE_DEP_TOL = 1e-6

_EPS = float(np.finfo(np.float64).eps)


def _tolerance(rtol: float, nu: np.ndarray) -> float:
    # The gradient G nu + b is a sum of terms as large as nu_j (unit references): its rounding grows with them.
    return rtol + 32.0 * _EPS * nu.shape[0] * (1.0 + float(nu.sum()))


def _kkt_violation(G: np.ndarray, b: np.ndarray, nu: np.ndarray) -> float:
    """Largest violation (in cosines) of feasibility ``G nu + b >= 0`` or stationarity on the support."""
    grad = G @ nu + b
    infeasible = float(max(0.0, -grad.min(initial=0.0)))
    support = nu > 0
    stationary = float(np.abs(grad[support]).max(initial=0.0))
    return max(infeasible, stationary)


def _least_squares_on(G: np.ndarray, b: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """``z`` minimising the objective with ``z_j = 0`` off ``passive`` (minimum norm if singular)."""
    z = np.zeros_like(b)
    idx = np.flatnonzero(passive)
    if idx.size:
        z[idx] = np.linalg.lstsq(G[np.ix_(idx, idx)], -b[idx], rcond=None)[0]
    return z


def _move_into_positive(G: np.ndarray, b: np.ndarray, passive: np.ndarray, nu: np.ndarray,
                        z: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lawson–Hanson's inner loop: from feasible ``nu``, walk towards the sub-problem solution ``z``.

    Each pass removes at least one index from ``passive``, so it ends after at most ``|passive|`` passes.
    """
    passive = passive.copy()
    while True:
        if z is None:
            z = _least_squares_on(G, b, passive)
        blocked = passive & (z <= 0)
        if not blocked.any():
            z[~passive] = 0.0
            return np.maximum(z, 0.0), passive
        idx = np.flatnonzero(blocked)
        denom = nu[idx] - z[idx]
        ratios = np.where(denom > 0, nu[idx] / np.where(denom > 0, denom, 1.0), 0.0)
        first = int(np.argmin(ratios))
        step = float(np.clip(ratios[first], 0.0, 1.0))
        nu = nu + step * (z - nu)
        # The blocking index leaves even if rounding left it at +1e-16 (else the next pass stalls on it).
        passive[idx[first]] = False
        passive &= nu > 0
        nu = np.where(passive, nu, 0.0)
        z = None
        if not passive.any():
            return nu, passive


def _squared_sine(G: np.ndarray, passive: np.ndarray, t: int) -> float:
    """Squared sine between unit reference t and the span of the passive ones (1 when none is passive)."""
    idx = np.flatnonzero(passive)
    if idx.size == 0:
        return float(G[t, t])
    y = np.linalg.lstsq(G[np.ix_(idx, idx)], G[idx, t], rcond=None)[0]
    return float(G[t, t] - G[t, idx] @ y)


def _active_set(G: np.ndarray, b: np.ndarray, rtol: float, nu: np.ndarray | None = None,
                max_iter: int | None = None, fine_rtol: float | None = None,
                dep_tol: float = CONE_DEP_TOL) -> tuple[np.ndarray, bool]:
    """Lawson–Hanson NNLS on the Gram, optionally warm-started from a feasible ``nu``. Returns (nu, converged).

    Every conflict beyond ``rtol`` is resolved; one beyond ``fine_rtol`` only by a reference whose squared
    sine to the active span is at least ``dep_tol`` (see ``CONE_FINE_RTOL``).
    """
    fine_rtol = rtol if fine_rtol is None else min(fine_rtol, rtol)
    k = b.shape[0]
    if nu is None:
        nu = np.zeros(k)
        passive = np.zeros(k, dtype=bool)
    else:
        nu = np.maximum(nu, 0.0)
        passive = nu > 0
        if passive.any():
            nu, passive = _move_into_positive(G, b, passive, nu)
    refused = np.zeros(k, dtype=bool)
    for _ in range(max_iter if max_iter is not None else 6 * k + 20):
        grad = G @ nu + b
        candidates = ~passive & ~refused & (grad < -_tolerance(fine_rtol, nu))
        if not candidates.any():
            return nu, True
        t = int(np.argmin(np.where(candidates, grad, np.inf)))
        if grad[t] >= -_tolerance(rtol, nu) and _squared_sine(G, passive, t) < dep_tol:
            refused[t] = True  # a small conflict the active references already span: rounding, not geometry
            continue
        trial = passive.copy()
        trial[t] = True
        z = _least_squares_on(G, b, trial)
        if not z[t] > 0:
            # In exact arithmetic a violated constraint always enters with z_t > 0; here rounding made r_t
            # (numerically) dependent on the active references. Refuse it until the active set changes.
            refused[t] = True
            continue
        refused[:] = False
        nu, passive = _move_into_positive(G, b, trial, nu, z)
    return nu, False


def _coordinate_descent(G: np.ndarray, b: np.ndarray, nu: np.ndarray, rtol: float,
                        sweeps: int = 2000) -> np.ndarray:
    """Cyclic projected coordinate descent on unit-diagonal ``G``: every step lowers the objective (no cycling)."""
    nu = np.maximum(nu, 0.0)
    grad = G @ nu + b
    for sweep in range(sweeps):
        for j in range(b.shape[0]):
            new = max(0.0, nu[j] - grad[j] / G[j, j])
            if new != nu[j]:
                grad += (new - nu[j]) * G[:, j]
                nu[j] = new
        if sweep % 16 == 15:
            grad = G @ nu + b  # drop the rounding the rank-one updates accumulated
            if _kkt_violation(G, b, nu) <= _tolerance(rtol, nu):
                break
    return nu


def _solve_unit(G: np.ndarray, b: np.ndarray, rtol: float) -> np.ndarray:
    """The solve for unit references (diag(G) = 1) and a unit gradient."""
    nu, converged = _active_set(G, b, rtol, fine_rtol=CONE_FINE_RTOL)
    if converged and _kkt_violation(G, b, nu) <= _tolerance(rtol, nu):
        return nu
    # Coordinate descent from the active set's (feasible, mu >= 0) iterate only ever improves on it; its
    # support then seeds a second active-set pass, which finishes what descent does slowly.
    descent = _coordinate_descent(G, b, nu, rtol)
    candidates = [nu, descent, _active_set(G, b, rtol, nu=descent, fine_rtol=CONE_FINE_RTOL)[0]]
    return min(candidates, key=lambda c: _kkt_violation(G, b, c) - _tolerance(rtol, c))


def _drop_null_directions(G: np.ndarray, b: np.ndarray, rtol: float, max_rank: int) -> np.ndarray:
    """The solve on unit ``G``, ``b`` when ``rank(G) <= max_rank < k`` is known from the vectors' length.

    The ``k - max_rank`` smallest eigenvalues belong to exact null directions ``v`` (``R^T v = 0``), so
    ``v . b = (R^T v) . g = 0`` too: both are projected out (``P`` = the projector onto the kept eigenvectors)
    and the problem solved on ``P G P``, ``P b``, whose rounding no longer fakes extra dimensions. Any
    minimiser ``nu`` gives the same ``R^T nu``; ``P nu`` is the minimum-norm representative (it may have
    negative entries), whose small coefficients also keep the fp32 combine pass from cancelling large terms.
    """
    k = b.shape[0]
    if max_rank <= 0:
        return np.zeros(k)
    w, V = np.linalg.eigh(G)  # ascending
    keep = V[:, k - max_rank:]
    G_kept = (keep * w[k - max_rank:]) @ keep.T
    b_kept = keep @ (keep.T @ b)
    if b_kept.min() >= -rtol:  # the conflict was rounding along a null direction
        return np.zeros(k)
    nu = _solve_unit(0.5 * (G_kept + G_kept.T), b_kept, rtol)
    return keep @ (keep.T @ nu)


def nonneg_quadratic_min(G: np.ndarray, b: np.ndarray, gg: float, rtol: float = CONE_RTOL,
                         max_rank: int | None = None) -> np.ndarray:
    """``argmin_{mu >= 0} 1/2 mu^T G mu + mu^T b`` for one problem (``G`` k x k PSD, ``b`` k, ``gg = |g|^2``).

    Any scaling of the references and the gradient is fine (the solve rescales to unit vectors). A
    reference is treated as conflicting only while ``r_j . g' < -rtol |r_j| |g|``. Zero references, and
    every entry of a problem with non-finite or zero-gradient input, get ``mu_j = 0``.

    ``max_rank``: an upper bound on ``rank(G)`` known to the caller (the vectors' length n). When fewer than
    the live references, the Gram's null directions are removed first (see :func:`_drop_null_directions`);
    the result is then the minimum-norm ``mu`` giving the same ``R^T mu``, not necessarily ``>= 0``.
    """
    G = np.asarray(G, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    k = b.shape[0]
    mu = np.zeros(k)
    if not (np.isfinite(G).all() and np.isfinite(b).all() and np.isfinite(gg)):
        return mu
    diag = np.diagonal(G)
    live = np.flatnonzero(diag > 0)
    if live.size == 0:
        return mu
    d = 1.0 / np.sqrt(diag[live])
    G_unit = G[np.ix_(live, live)] * d[:, None] * d[None, :]
    np.fill_diagonal(G_unit, 1.0)
    b_unit = b[live] * d
    # |g| >= |b_j| / |r_j| (Cauchy-Schwarz) even when fp32 rounding made gg inconsistent.
    g_norm = float(np.sqrt(max(float(gg), float((b_unit ** 2).max()), 0.0)))
    if g_norm == 0.0 or b_unit.min() >= -rtol * g_norm:
        return mu
    G_unit = 0.5 * (G_unit + G_unit.T)
    if max_rank is not None and max_rank < live.size:
        nu = _drop_null_directions(G_unit, b_unit / g_norm, rtol, max_rank)
    else:
        nu = _solve_unit(G_unit, b_unit / g_norm, rtol)
    mu[live] = nu * g_norm * d
    return mu


def nonneg_quadratic_min_batch(G: np.ndarray, b: np.ndarray, gg: np.ndarray,
                               rtol: float = CONE_RTOL, max_rank: np.ndarray | None = None) -> np.ndarray:
    """:func:`nonneg_quadratic_min` over a batch (``G [m, k, k]``, ``b [m, k]``, ``gg [m]``).

    Problems without a conflict (every ``r_j . g >= -rtol |r_j| |g|``: most parameter tensors, most steps)
    are recognised in one vectorised pass and get ``mu = 0`` without a Python-level solve. ``max_rank``
    (``[m]`` ints, or None): each problem's bound on ``rank(G)``, as in :func:`nonneg_quadratic_min`.
    """
    G = np.asarray(G, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    gg = np.asarray(gg, dtype=np.float64)
    mu = np.zeros(b.shape)
    diag = np.diagonal(G, axis1=-2, axis2=-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        norms = np.sqrt(np.where(diag > 0, diag, 0.0))
        cos_scaled = np.where(norms > 0, b / np.where(norms > 0, norms, 1.0), 0.0)
        g_norm = np.sqrt(np.maximum(gg, 0.0))
        conflict = (cos_scaled < -rtol * g_norm[:, None]).any(axis=1)
    for i in np.flatnonzero(conflict):
        mu[i] = nonneg_quadratic_min(G[i], b[i], float(gg[i]), rtol,
                                     None if max_rank is None else int(max_rank[i]))
    return mu

"""Lanczos iteration for the top eigenvalue `λ_1` of a symmetric positive
semi-definite operator (`spectral.stable_rank`'s Gram matrix), with a
stopping rule that bounds the error. Float64 numpy; the operator is a function.

The stopping rule. Ritz values never exceed `λ_1`; the top one `θ_1` stops
1. (precision) when the residual bound certifies `tol`: the top Ritz pair's
   residual `r = β_k |s_k|` (`s_k` the last entry of the tridiagonal's top
   eigenvector) puts an eigenvalue of `G` within `r` of `θ_1`, and within
   `r² / gap` when the gap to the second Ritz value exceeds `r`
   (Kato-Temple, with the Ritz gap as in ARPACK): `min(r, r²/gap) <= tol θ_1`;
2. (reliability) and once `λ_1` itself is known to be within 0.49% above
   `θ_1`. A residual bound cannot tell `λ_1` from a lower eigenvalue the
   start vector reaches first (a start vector with a 1e-3 component on the
   top singular vector stops 6% low after 5 steps on residual alone; see the
   tests). Two probabilistic certificates, either suffices, each failing
   with probability at most `_FAILURE / 2` over a start vector uniform on the
   sphere (1e-6 in all), whatever the spectrum:
   a. (a posteriori, usually first) the Lanczos vector `v_{k+1}` is
      `p_k(G) v_1 / (β_1 ⋯ β_k)`, `p_k` the characteristic polynomial of the
      tridiagonal `T_k`, so `|c_1| p_k(λ_1) <= β_1 ⋯ β_k` (`c_1` the start
      vector's component on the top eigenspace). `p_k` increases above
      `θ_1`: if `p_k(α) >= β_1 ⋯ β_k / δ` at `α = (1 + ε) θ_1`, then
      `λ_1 > α` would need `|c_1| < δ`, which has probability at most
      `2δ / B(1/2, (n − 1)/2)` (the density of `c_1` is at most
      `1 / B(1/2, (n − 1)/2)`); `δ` makes that `_FAILURE / 2`. Used when the
      floor (b.) is below `n` (so matrices with `n <= 125` stay exact, 3.);
      checked every few steps, `log p_k(α)` from the pivots of `T_k − α` (Hochstenbach's
      probabilistic upper bound, 2013). On spectra with a separated top (real
      pretrained kernels) it certifies within tens of steps; on Gaussian
      matrices in 60-90;
   b. (a priori) Kuczynski and Wozniakowski (SIAM J. Matrix Anal. Appl.
      13(4), 1992, Thm 4.2): after `k` steps
      `P(θ_1 < (1 − ε) λ_1) <= 1.648 sqrt(n) exp(−sqrt(ε) (2k − 1))`; the
      step floor is the `k` that makes this `_FAILURE / 2` for
      `ε = _FLOOR_EPS`: 135 steps at `n = 2048`;
3. or at step `n` (the Krylov space is then everything: exact up to
   round-off, so every matrix with `n <= 125`, where the floor is `n`, is
   solved exactly), or at an
   invariant subspace (`β_k <= _BREAKDOWN θ_1`: its Ritz values are
   eigenvalues).
The start vector is a fixed draw (`_START_SEED`): results are deterministic,
and the probability statement holds for any matrix not built from that draw.
"""

import math

import numpy as np

#: Seed of the fixed start vector: the iteration is deterministic.
_START_SEED = 20240613

#: The reliability certificates (module docstring, 2.): `λ_1 <= (1 +
#: _FLOOR_EPS) θ_1` except with probability `_FAILURE` in all (half each).
_FLOOR_EPS = 4.9e-3
_FAILURE = 1e-6

#: `β_k <= _BREAKDOWN · θ_1`: an invariant subspace, the iteration ends.
_BREAKDOWN = 1e-6


def _floor_steps(n):
    """The step floor for an `n x n` Gram matrix (module docstring, 2.b)."""
    k = (math.log(1.648 * math.sqrt(n) / (_FAILURE / 2)) / math.sqrt(_FLOOR_EPS) + 1.0) / 2.0
    return min(n, math.ceil(k))


def _log_delta(n):
    """`log δ` with `P(|c_1| < δ) <= _FAILURE / 2` for `c_1` a coordinate of a
    vector uniform on the unit sphere of `R^n`, `n >= 3` (module docstring,
    2.a): its density `(1 − c²)^((n−3)/2) / B(1/2, (n−1)/2)` is at most `1 / B`."""
    m = (n - 1) / 2.0
    log_beta = math.lgamma(0.5) + math.lgamma(m) - math.lgamma(m + 0.5)
    return math.log(_FAILURE / 2) + log_beta - math.log(2.0)


def _upper_bound_holds(alphas, betas, beta, theta, n):
    """Whether `λ_1 <= (1 + _FLOOR_EPS) θ_1` is certified a posteriori (module
    docstring, 2.a): `log p_k(α) − Σ log β_j >= −log δ` at `α = (1 +
    _FLOOR_EPS) θ_1`, `log p_k(α) = Σ log` of the pivots of `T_k − α` (all
    positive above the top Ritz value)."""
    target = (1.0 + _FLOOR_EPS) * theta
    total = -math.log(beta) - sum(math.log(b) for b in betas) + _log_delta(n)
    pivot = target - alphas[0]
    for i in range(len(alphas)):
        if i:
            pivot = (target - alphas[i]) - betas[i - 1] * betas[i - 1] / pivot
        if not pivot > 0.0:  # round-off at the top Ritz value: no certificate
            return False
        total += math.log(pivot)
    return total >= 0.0


def _sturm_counts(alphas, squares, shifts, pivmin):
    """Eigenvalues of the tridiagonal below each of `shifts` (any shape): the
    negative pivots of the `LDL^T` factorizations of `T - shift` (Sturm)."""
    d = alphas[0] - shifts
    count = (d < 0).astype("int64")
    for i in range(1, len(alphas)):
        d = np.where(np.abs(d) < pivmin, -pivmin, d)
        d = (alphas[i] - shifts) - squares[i - 1] / d
        count += d < 0
    return count


def _last_component(a, b, theta, pivmin):
    """`|s_k|`: the last entry of the unit eigenvector of the tridiagonal for
    its eigenvalue `theta`, from a twisted factorization (Parlett-Dhillon):
    pivots of `T − θ` from the top (`dp`) and the bottom (`dm`), the twist
    `t` where `|dp + dm − (a − θ)|` is least (the vector is largest there),
    `x_t = 1` and the two recurrences away from it, in logarithms (a
    converged pair's `s_k` can be below 1e-300)."""
    k = a.size
    c = a - theta
    dp, dm = np.empty(k), np.empty(k)
    dp[0], dm[-1] = c[0], c[-1]
    for i in range(1, k):
        prev = dp[i - 1] if abs(dp[i - 1]) >= pivmin else -pivmin
        dp[i] = c[i] - b[i - 1] * b[i - 1] / prev
        j = k - 1 - i
        nxt = dm[j + 1] if abs(dm[j + 1]) >= pivmin else -pivmin
        dm[j] = c[j] - b[j] * b[j] / nxt
    twist = int(np.argmin(np.abs(dp + dm - c)))
    safe = lambda d: np.where(np.abs(d) >= pivmin, d, -pivmin)  # noqa: E731
    with np.errstate(divide="ignore"):
        up = np.log(np.abs(b[:twist] / safe(dp[:twist])))  # x_i / x_{i+1}, i < t
        down = np.log(np.abs(b[twist:] / safe(dm[twist + 1 :])))  # x_i / x_{i-1}, i > t
    log_x = np.concatenate([np.cumsum(up[::-1])[::-1], [0.0], np.cumsum(down)])
    top = float(np.max(log_x))
    log_norm = top + 0.5 * float(np.log(np.sum(np.exp(2.0 * (log_x - top)))))
    return float(np.exp(log_x[-1] - log_norm))


def _top_ritz(alphas, betas, beta):
    """`(θ_1, bound)` of the tridiagonal `T_k` (diagonal `alphas`, off-diagonal
    `betas`); see the module docstring, 1. `bound` is `r = β |s_k|` of the top
    Ritz pair, or `r² / gap` when the gap to the second Ritz value exceeds `r`.

    No LAPACK (on a loaded machine a threaded `numpy.linalg.eigh` of a
    130 x 130 matrix can take 0.5 s): the top two eigenvalues by multisection
    on Sturm counts, `|s_k|` by `_last_component`.
    """
    a, b = np.asarray(alphas), np.asarray(betas)
    k = a.size
    if k == 1:
        return float(a[0]), float(beta)
    squares = b * b
    radius = np.concatenate([[0.0], np.abs(b)]) + np.concatenate([np.abs(b), [0.0]])
    pivmin = np.finfo("float64").tiny * max(1.0, float(squares.max()))
    lo = np.full(2, float(np.min(a - radius)))
    hi = np.full(2, float(np.max(a + radius)))
    below = np.array([[k - 1], [k - 2]])  # the top (second) eigenvalue has k-1 (k-2) below
    fractions = np.arange(1, 64) / 64.0
    rows = np.arange(2)
    resolution = 4 * np.finfo("float64").eps * max(abs(lo[0]), abs(hi[0]))
    while np.any(hi - lo > resolution):
        shifts = lo[:, None] + (hi - lo)[:, None] * fractions
        passed = (_sturm_counts(a, squares, shifts, pivmin) <= below).sum(axis=1)
        lo = np.where(passed > 0, shifts[rows, np.maximum(passed - 1, 0)], lo)
        hi = np.where(passed < fractions.size, shifts[rows, np.minimum(passed, 62)], hi)
    theta, second = 0.5 * (lo + hi)
    residual = beta * _last_component(a, b, theta, pivmin)
    gap = float(theta - second)
    bound = min(residual, residual * residual / gap) if gap > residual else residual
    return float(theta), bound


def top_eigenvalue(apply, n, tol, max_steps):
    """Lanczos on the `n x n` operator `apply` until the stopping rule holds.

    Returns `(θ_1, steps, certified)`: certified is False when `max_steps`
    ended it first. The rule is checked every few steps before the floor
    (for the a posteriori certificate; not when the floor is `n`, where only
    the whole space ends it), at each step from the floor on, every `k // 32`
    steps past 1.5 floors (the tridiagonal solves add up).
    """
    floor, last = _floor_steps(n), min(n, max_steps)
    start = np.random.default_rng(_START_SEED).standard_normal(n)
    basis = np.zeros((min(last, floor + 16), n))
    basis[0] = start / np.linalg.norm(start)
    alphas, betas = [], []
    for k in range(1, last + 1):
        w = apply(basis[k - 1])
        alphas.append(float(basis[k - 1] @ w))
        active = basis[:k]
        for _ in range(2):  # full re-orthogonalization, twice (Parlett's rule)
            w -= active.T @ (active @ w)
        beta = float(np.linalg.norm(w))
        # max(alphas) <= θ_1: a breakdown test without the tridiagonal solve.
        breakdown = beta <= _BREAKDOWN * max(max(alphas), np.finfo("float32").tiny)
        if k < floor:
            check = floor < n and k >= 4 and k % max(2, k // 8) == 0
        else:
            check = 2 * k <= 3 * floor or k % max(1, k // 32) == 0
        if breakdown or k == last or check:
            theta, bound = _top_ritz(alphas, betas, beta)
            if breakdown or k == n:  # an invariant subspace, or the whole space
                return theta, k, True
            if bound <= tol * theta and (k >= floor or _upper_bound_holds(alphas, betas, beta, theta, n)):
                return theta, k, True
            if k == last:
                return theta, k, False
        betas.append(beta)
        if k == basis.shape[0]:
            basis = np.concatenate([basis, np.zeros((min(last, 2 * k) - k, n))])
        basis[k] = w / beta
    raise AssertionError("unreachable")

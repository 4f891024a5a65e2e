"""Spectral quantities of matrices: the stable rank (SR-LoRA) and the spectral
entropy importance (FlexLoRA). Matrices only: a projection layer is turned
into its `(d_in, d_out)` matrix view by `core.quantization.kernel_matrix`.

`stable_rank(W) = ||W||_F^2 / sigma_1(W)^2` (SR-LoRA, Sec. 3.1). No SVD is
formed: `sigma_1^2` is the top eigenvalue `λ_1` of the smaller Gram matrix
`G` (`W^T W` or `W W^T`, side `n = min(d_in, d_out)`), found by Lanczos
iteration (Krylov basis fully re-orthogonalized, float64 numpy). For
`n <= _GRAM_MAX_DIM` `G` is formed once (one float32 `keras.ops` product,
compute-bound, on the accelerator if there is one) and a step is one product
with it; above, a step is two memory-bound products with `W` and `W^T`.

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
import warnings

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.core.kernel_view import base_layer, is_projection
from keras_adaptive_lora.core.quantization import kernel_matrix

#: The `ε` of FlexLoRA's importance score (paper eq. 3).
ENTROPY_EPS = 1e-12

#: Seed of the fixed start vector: the iteration is deterministic.
_START_SEED = 20240613

#: `||W||_F` must lie in `[2**_SAFE_LOW, 2**_SAFE_HIGH]` for `W` to be used as
#: it is (the scale `1 / ||W||_F` is applied to the products, in float64):
#: float32 squares and Gram products then neither overflow nor underflow.
#: Otherwise `W` is first divided by its largest absolute entry.
_SAFE_LOW, _SAFE_HIGH = -30, 40

#: The largest Gram side `n` formed explicitly (float32, 64 MiB at 4096).
_GRAM_MAX_DIM = 4096

#: The reliability certificates (module docstring, 2.): `λ_1 <= (1 +
#: _FLOOR_EPS) θ_1` except with probability `_FAILURE` in all (half each).
_FLOOR_EPS = 4.9e-3
_FAILURE = 1e-6

#: `β_k <= _BREAKDOWN · θ_1`: an invariant subspace, the iteration ends.
_BREAKDOWN = 1e-6


def _as_matrix(x):
    """A float32 2-D tensor from a layer, an adapter, a variable or an array."""
    if is_projection(base_layer(x)):
        return kernel_matrix(x)
    if isinstance(x, keras.layers.Layer):
        raise ValueError(
            f"`stable_rank` got a {type(x).__name__} layer ('{x.name}'); pass a "
            "keras.layers.Dense / keras.layers.EinsumDense (or an adapter "
            "wrapping one), or a 2-D matrix."
        )
    if isinstance(x, keras.Variable):
        x = x.value
    try:
        matrix = ops.convert_to_tensor(x, dtype="float32")
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`stable_rank` expects a layer or a 2-D matrix; could not convert "
            f"{type(x).__name__} to a float32 tensor ({error})."
        ) from None
    if len(matrix.shape) != 2:
        raise ValueError(
            "`stable_rank` expects a 2-D matrix; got shape "
            f"{tuple(matrix.shape)}. For a layer's kernel pass the layer itself "
            "so that its (d_in, d_out) matrix view is used."
        )
    if 0 in tuple(matrix.shape):
        raise ValueError(f"`stable_rank` got an empty matrix of shape {tuple(matrix.shape)}.")
    return matrix


def _row_norms(matrix):
    """Euclidean norms of the rows of `matrix` as float64 numpy (one read)."""
    return ops.convert_to_numpy(ops.norm(matrix, axis=1)).astype("float64")


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


def _gram_operator(matrix, scale):
    """`(apply, n)`: `v -> G v` (float64 numpy vectors of size `n`) for the
    smaller Gram matrix of `scale * matrix`: float32 `keras.ops` products with
    the symmetrized Gram matrix (formed once, `n <= _GRAM_MAX_DIM`) or with
    `matrix` and its transpose; the scale is applied in float64."""
    rows, cols = (int(d) for d in matrix.shape)
    n = min(rows, cols)
    if n <= _GRAM_MAX_DIM:
        if cols <= rows:
            gram = ops.matmul(ops.transpose(matrix), matrix)
        else:
            gram = ops.matmul(matrix, ops.transpose(matrix))
        gram = ops.multiply(ops.add(gram, ops.transpose(gram)), 0.5)

        def product(x):  # x: (n, 1)
            return ops.matmul(gram, x)

    elif cols <= rows:  # W^T W acting on (cols,) vectors

        def product(x):
            h = ops.matmul(matrix, x)  # (rows, 1)
            return ops.matmul(ops.reshape(h, (1, rows)), matrix)  # (1, cols)

    else:  # W W^T acting on (rows,) vectors

        def product(x):
            h = ops.matmul(ops.reshape(x, (1, rows)), matrix)  # (1, cols)
            return ops.matmul(matrix, ops.reshape(h, (cols, 1)))  # (rows, 1)

    gram_scale = scale * scale

    def apply(v):
        x = ops.convert_to_tensor(v.astype("float32").reshape(n, 1))
        out = ops.convert_to_numpy(product(x)).astype("float64").reshape(n)
        return out * gram_scale

    return apply, n


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


def _lanczos(apply, n, tol, max_steps):
    """Lanczos on the `n x n` operator `apply` until the stopping rule holds.

    Returns `(θ_1, steps, certified)`: certified is False when `max_steps`
    ended it first. The rule is checked at each step from the floor on (every
    `k // 32` steps past 1.5 floors: the tridiagonal solves add up).
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
        # Checks: every few steps before the floor (the a posteriori
        # certificate), each step from it, every `k // 32` past 1.5 floors.
        stride = max(2, k // 8) if k < floor else 1 if 2 * k <= 3 * floor else max(1, k // 32)
        if breakdown or k == last or (k >= 4 and k % stride == 0) or k == floor:
            theta, bound = _top_ritz(alphas, betas, beta)
            exact = breakdown or k == n  # an invariant subspace, or the whole space
            if exact:
                return theta, k, True
            reliable = k >= floor or (floor < n and _upper_bound_holds(alphas, betas, beta, theta, n))
            if bound <= tol * theta and reliable:
                return theta, k, True
            if k == last:
                return theta, k, False
        betas.append(beta)
        if k == basis.shape[0]:
            basis = np.concatenate([basis, np.zeros((min(last, 2 * k) - k, n))])
        basis[k] = w / beta
    raise AssertionError("unreachable")


def _check_iteration_args(max_iterations, tol):
    cap = max_iterations
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1
    ):
        raise ValueError(f"`max_iterations` must be None or an integer >= 1, got {cap!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"`tol` must be a number in [0, 1), got {tol!r}.")


def _stable_rank(x, max_iterations=None, tol=1e-4):
    """`(stable rank, Lanczos steps, certified)`; see `stable_rank`."""
    _check_iteration_args(max_iterations, tol)
    # Read only: no autograd graph through the kernel (torch).
    matrix = ops.stop_gradient(_as_matrix(x))
    non_finite = ValueError(
        "`stable_rank` got a matrix with NaN or infinite entries; the stable "
        "rank is undefined."
    )
    # One pass: the row norms give ||W||_F^2 (summed in float64), the scale,
    # and reveal NaN (a NaN norm) and infinite entries (an infinite norm).
    row_norms = _row_norms(matrix)
    if np.isnan(row_norms).any():
        raise non_finite
    frobenius = float(np.sqrt(np.sum(np.square(row_norms))))
    if not 2.0**_SAFE_LOW <= frobenius <= 2.0**_SAFE_HIGH:
        # Zero, tiny (squares underflow), huge (overflow) or infinite
        # entries: rescale by the largest absolute entry (max and min: no
        # temporary the size of the matrix) and measure again.
        extremes = ops.convert_to_numpy(
            ops.stack([ops.max(matrix), ops.negative(ops.min(matrix))])
        ).astype("float64")
        largest = float(np.max(extremes))
        if not np.isfinite(extremes).all():
            raise non_finite
        if largest == 0.0:
            if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(matrix)))):
                raise non_finite  # a reduction may have skipped NaNs
            return 0.0, 0, True
        matrix = ops.divide(matrix, largest)
        row_norms = _row_norms(matrix)
        frobenius = float(np.sqrt(np.sum(np.square(row_norms))))
        if not np.isfinite(frobenius):
            raise non_finite
    apply, n = _gram_operator(matrix, 1.0 / frobenius)
    max_steps = n if max_iterations is None else int(max_iterations)
    sigma1_sq, steps, certified = _lanczos(apply, n, float(tol), max_steps)
    # `||W||_F^2` is 1 after the scaling. Ritz values never exceed sigma_1^2;
    # the clip only removes float32 round-off outside the possible range.
    return float(np.clip(1.0 / sigma1_sq, 1.0, float(n))), steps, certified


def stable_rank(x, *, max_iterations=None, tol=1e-4):
    """Stable rank `||W||_F^2 / sigma_1(W)^2` of a matrix or a layer's kernel.

    For a `Dense`/`EinsumDense` layer (or an adapter wrapping one) `W` is the
    `(d_in, d_out)` matrix view of its (base) kernel, see `KernelView`; never a
    kernel slice. Anything else must be a 2-D matrix (numpy array, backend
    tensor or `keras.Variable`).

    `||W||_F^2` comes from the row norms of `W` (one pass, which also detects
    NaN and infinite entries and gives the scale: the stable rank is scale
    invariant, and a matrix with an extreme Frobenius norm, outside about
    `[1e-9, 1e12]`, is first divided by its largest entry). `sigma_1^2` is the
    top eigenvalue of the smaller Gram matrix, by Lanczos iteration from a
    fixed start vector (deterministic) with a stopping rule that bounds the
    error (module docstring): a residual bound certifies `tol`, and a
    probabilistic upper bound on `sigma_1` (a posteriori, from the Lanczos
    polynomial, or a step floor: 135 steps for `min(d_in, d_out) = 2048`)
    makes a Ritz value stuck at a lower eigenvalue improbable (below 1e-6 for
    a stable rank more than 0.49% off, whatever the spectrum);
    `min(d_in, d_out) <= 125` is solved exactly. Cost: one float32 product
    `W^T W` (an `n x n` temporary, `n <= 4096`) and tens of small steps (up to
    135 at `n = 2048`).

    A zero matrix has no dominant direction and `0 / 0` is undefined: by
    convention its stable rank is `0.0` (no exception), so diagnostics such as
    the stable rank of a LoRA update `A B` with `B = 0` at initialization stay
    finite. SR-LoRA's rank allocation clamps it to rank 1.

    Args:
        x: a `keras.layers.Dense`/`keras.layers.EinsumDense`, an adapter, or a
            2-D matrix.
        max_iterations: a cap on the Lanczos steps. Defaults to None: as many
            as the stopping rule needs, at most `min(d_in, d_out)` (then the
            result is exact up to round-off). A cap reached before the rule
            holds gives the estimate so far (an underestimate of `sigma_1`,
            so the stable rank is too high) and a `RuntimeWarning`.
        tol: the relative error of `sigma_1^2` (and so of the stable rank) the
            residual bound must certify. Defaults to 1e-4; `0` runs until an
            invariant subspace is found or all `min(d_in, d_out)` steps.

    Returns:
        The stable rank, a Python float in `[1, min(d_in, d_out)]` (or 0.0 for
        a zero matrix).

    Example:
    ```python
    import numpy as np
    from keras_adaptive_lora.spectral import stable_rank
    stable_rank(np.diag([2.0, 1.0, 1.0]))  # (4 + 1 + 1) / 4 = 1.5
    ```
    """
    value, steps, certified = _stable_rank(x, max_iterations, tol)
    if not certified:
        warnings.warn(
            f"`stable_rank` stopped at max_iterations={max_iterations} before its "
            f"error bound reached tol={tol}; the value {value:.6g} may be too high. "
            "Leave `max_iterations` at None for a certified result.",
            RuntimeWarning,
            stacklevel=2,
        )
    return value


def spectral_entropy_importance(singular_values, mask=None, eps=ENTROPY_EPS):
    """Normalized spectral entropy of the active singular values (paper eq. 3).

    `s_i = λ_i² / Σ_j λ_j²` and `I = −(1 / log r) Σ_i s_i log(s_i + ε)` over the
    `r` active components. Always finite: `I = 0` when `r <= 1` (the reference
    code divides by `log 1 = 0` and returns NaN, which its top-k then ranks
    first) and when every active `λ` is zero (no spectrum to measure).
    Computed in float64 numpy: it runs in the callback, outside the compiled
    train step.

    Args:
        singular_values: the `λ` vector, shape `(R,)` (array-like or tensor).
        mask: optional active mask, shape `(R,)`; nonzero entries are active.
            Defaults to all components active.
        eps: the `ε` inside the logarithm. Defaults to 1e-12.

    Returns:
        A Python float in `[0, 1]` (up to `ε`).

    Example:
    ```python
    spectral_entropy_importance([1.0, 1.0, 1.0])        # 1.0 (flat spectrum)
    spectral_entropy_importance([1.0, 0.0], [1, 1])     # ~0.0 (one direction)
    ```
    """
    lam = np.asarray(ops.convert_to_numpy(singular_values), dtype=np.float64).reshape(-1)
    if mask is not None:
        m = np.asarray(ops.convert_to_numpy(mask)).reshape(-1)
        if m.shape != lam.shape:
            raise ValueError(
                f"`mask` has shape {m.shape} but `singular_values` has shape "
                f"{lam.shape}; they must match."
            )
        lam = lam[m != 0]
    if not np.all(np.isfinite(lam)):
        raise ValueError(
            "The singular values contain NaN or inf; the importance score is "
            "undefined. Training has diverged (lower the learning rate, or add "
            "`keras.callbacks.TerminateOnNaN()`)."
        )
    r = lam.size
    energy = lam * lam
    total = float(energy.sum())
    if r <= 1 or not total > 0.0:
        return 0.0
    s = energy / total
    return float(-np.sum(s * np.log(s + eps)) / math.log(r))

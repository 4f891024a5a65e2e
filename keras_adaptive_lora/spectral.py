"""Spectral quantities of matrices: the stable rank (SR-LoRA) and the spectral
entropy importance (FlexLoRA). Matrices only: a projection layer is turned
into its `(d_in, d_out)` matrix view by `core.quantization.kernel_matrix`.

`stable_rank(W) = ||W||_F^2 / sigma_1(W)^2` (SR-LoRA, Sec. 3.1). Only the top
singular value is needed, so no SVD is formed: `sigma_1^2` is the largest
eigenvalue of the Gram matrix `W^T W` (or `W W^T`, whichever is smaller),
found by a Lanczos iteration (power iteration with the Krylov subspace kept and
re-orthogonalized) on matrix-vector products with `W` and `W^T`: the products
with the (large) matrix run in float32 with `keras.ops`, the bookkeeping on the
(small) Krylov vectors in float64 with numpy.

Why single-vector Lanczos and not a block Krylov method: a Lanczos step is two
memory-bound matrix-vector products (a read of `W` each); a block step with
`p` vectors is two matrix-matrix products. On the CPUs this was tuned on, a
block step with p = 16-32 costs 10-20 matrix-vector steps, while on Gaussian
random kernels (the hard case: clustered top singular values) block Krylov
with p = 32 still needs 9-10 block steps for a 1e-3 relative error against
25-45 Lanczos steps, so Lanczos is 3-5x faster at equal accuracy. For the
eigenvalue, single-vector Lanczos is the best use of a pass over `W`.
"""

import math

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
#: it is (the scale `1 / ||W||_F` is then applied to the small vectors):
#: float32 squares and Gram products then neither overflow nor lose accuracy
#: to underflow. Otherwise `W` is first divided by its largest absolute entry
#: (one more pass over it, only for such extreme magnitudes).
_SAFE_LOW, _SAFE_HIGH = -30, 40

#: Steps in a row that must pass the convergence test, see `_converged`.
_CALM_STEPS = 2


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


def _lanczos_top_eigenvalue(matrix, scale, max_iterations, tol, history=None):
    """Largest eigenvalue of the Gram matrix of `scale * matrix`.

    `matrix` is float32, finite and nonzero; `scale` a Python float with
    `||scale * matrix||_F` about 1, applied to the small vectors, never to
    the matrix. The Krylov vectors live in the smaller of the two dimensions;
    each step costs one matrix-vector product with `matrix` and one with its
    transpose (as a row-vector product, no transpose is materialized), i.e.
    two memory-bound passes over the matrix, in float32 with `keras.ops`. The
    Krylov basis, its full re-orthogonalization (which keeps Lanczos stable)
    and the small tridiagonal eigenproblem are float64 numpy. The iteration
    stops when `_converged` says so, after `max_iterations` steps, or when an
    invariant subspace is found (the Ritz values are then exact). If `history`
    is a list, the Ritz value of every step is appended to it.
    """
    rows, cols = (int(d) for d in matrix.shape)
    n = min(rows, cols)
    steps = min(max_iterations, n)
    gram_scale = scale * scale

    if cols <= rows:  # Gram W^T W acting on (cols,) vectors

        def gram(v):  # v: float32 numpy (n,)
            h = ops.matmul(matrix, ops.convert_to_tensor(v.reshape(cols, 1)))  # (rows, 1)
            return ops.matmul(ops.reshape(h, (1, rows)), matrix)  # (1, cols)

    else:  # Gram W W^T acting on (rows,) vectors

        def gram(v):
            h = ops.matmul(ops.convert_to_tensor(v.reshape(1, rows)), matrix)  # (1, cols)
            return ops.matmul(matrix, ops.reshape(h, (cols, 1)))  # (rows, 1)

    start = np.random.default_rng(_START_SEED).standard_normal(n)
    v = (start / np.linalg.norm(start)).astype("float32")
    basis = np.zeros((steps, n), "float64")  # row k: the k-th Lanczos vector
    basis[0] = v
    alphas, betas, estimates = [], [], []
    estimate = None
    for step in range(steps):
        w = ops.convert_to_numpy(gram(v)).astype("float64").reshape(n) * gram_scale
        alphas.append(float(basis[step] @ w))
        # Full re-orthogonalization, twice (Parlett's rule).
        active = basis[: step + 1]
        for _ in range(2):
            w -= active.T @ (active @ w)
        beta = float(np.linalg.norm(w))
        tridiagonal = np.diag(np.asarray(alphas))
        if betas:
            off = np.asarray(betas)
            tridiagonal += np.diag(off, 1) + np.diag(off, -1)
        estimate = float(np.linalg.eigvalsh(tridiagonal)[-1])
        estimates.append(estimate)
        if history is not None:
            history.append(estimate)
        # Invariant subspace found: the Ritz values are exact.
        breakdown = beta <= 1e-6 * max(abs(estimate), np.finfo("float32").tiny)
        if breakdown or step == steps - 1 or _converged(estimates, tol):
            break
        betas.append(beta)
        # The matrix sees the float32 vector; the basis keeps exactly it.
        v = (w / beta).astype("float32")
        basis[step + 1] = v
    return estimate


def _converged(estimates, tol):
    """Whether the last of the Ritz values `estimates` is within `tol`.

    The top Ritz value increases monotonically to `sigma_1^2` and its
    increments shrink roughly geometrically once the iteration has locked on.
    The relative error left is estimated from the last increment `d` and the
    ratio `q` of the last two as the tail of a geometric series,
    `d q / (1 - q)`; the iteration stops when this estimate and `d` itself are
    both at most `tol` (relative) at each of the last `_CALM_STEPS` steps, so
    one small increment does not stop it. In a nearly tied top cluster the
    estimate can stall inside the cluster for several steps and the test may
    stop there: the error is then at most about the relative width of the
    cluster in `sigma^2` (e.g. up to 2e-3 for 16 singular values within 0.15%
    of `sigma_1`), still well within the 0.5% the specification allows.
    """
    if len(estimates) < _CALM_STEPS + 2:
        return False
    for k in range(len(estimates) - _CALM_STEPS, len(estimates)):
        d_last = estimates[k] - estimates[k - 1]
        d_prev = estimates[k - 1] - estimates[k - 2]
        bound = tol * abs(estimates[k])
        if d_last > bound:
            return False
        if d_last > 0:
            ratio = d_last / d_prev if d_prev > 0 else 1.0
            if ratio >= 1.0 or d_last * ratio / (1.0 - ratio) > bound:
                return False
    return True


def stable_rank(x, *, max_iterations=100, tol=1e-4):
    """Stable rank `||W||_F^2 / sigma_1(W)^2` of a matrix or a layer's kernel.

    For a `Dense`/`EinsumDense` layer (or an adapter wrapping one) `W` is the
    `(d_in, d_out)` matrix view of its (base) kernel, see `KernelView`; never a
    kernel slice. Anything else must be a 2-D matrix (numpy array, backend
    tensor or `keras.Variable`).

    `||W||_F^2` is summed from the row norms of `W` (one pass, which also
    detects NaN and infinite entries and gives the scale). `sigma_1^2` comes
    from a Lanczos iteration on the smaller Gram matrix of `W`: products with
    `W` in float32 with `keras.ops`, two passes over `W` per step, the Krylov
    vectors and their full re-orthogonalization in float64 numpy; it starts
    from a fixed vector, so the result is deterministic. The scale
    `1 / ||W||_F` (the stable rank is scale invariant) is applied to the
    small vectors, so `W` is not copied; only a matrix with an extreme
    Frobenius norm (outside about `[1e-9, 1e12]`) is first divided by its
    largest absolute entry, which keeps float32 away from overflow and
    underflow. On Gaussian random matrices (the hardest case: clustered top
    singular values) and on Gemma-2B-sized kernels, the default tolerance gives
    a relative error around `5e-5` against a full SVD after 15-50 steps.

    A zero matrix has no dominant direction and `0 / 0` is undefined: by
    convention its stable rank is `0.0` (no exception), so diagnostics such as
    the stable rank of a LoRA update `A B` with `B = 0` at initialization stay
    finite. SR-LoRA's rank allocation clamps it to rank 1.

    Args:
        x: a `keras.layers.Dense`/`keras.layers.EinsumDense`, an adapter, or a
            2-D matrix.
        max_iterations: at most this many Lanczos steps (each one product with
            `W` and one with `W^T`). Defaults to 100.
        tol: target relative error of `sigma_1^2` (and so of the stable rank).
            The iteration stops when, at each of the last two steps, both the
            last increase of the estimate and the error left as extrapolated
            from the last two increases are at most `tol` relative. Since the
            estimate only increases toward `sigma_1^2`, the result is then
            typically within `tol / 2` of the exact value. Defaults to 1e-4;
            `0` runs all `max_iterations` steps (or until an invariant
            subspace is found).

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
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)) or (
        max_iterations < 1
    ):
        raise ValueError(f"`max_iterations` must be a positive integer, got {max_iterations!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"`tol` must be a number in [0, 1), got {tol!r}.")
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
            return 0.0
        matrix = ops.divide(matrix, largest)
        row_norms = _row_norms(matrix)
        frobenius = float(np.sqrt(np.sum(np.square(row_norms))))
        if not np.isfinite(frobenius):
            raise non_finite
    sigma1_sq = _lanczos_top_eigenvalue(
        matrix, 1.0 / frobenius, int(max_iterations), float(tol)
    )
    # `||W||_F^2` is 1 after the scaling. Lanczos Ritz values never exceed
    # the true sigma_1^2 and the estimate is at least the start vector's
    # Rayleigh quotient; the clip only removes float32 round-off outside the
    # mathematically possible range.
    limit = float(min(int(d) for d in matrix.shape))
    return float(np.clip(1.0 / sigma1_sq, 1.0, limit))


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

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

The stopping rule (`lanczos.py`): the top Ritz value `θ_1` (never above
`λ_1`) is returned once a residual bound certifies `tol` and `λ_1 <= 1.0049
θ_1` is certified, a posteriori or by a step floor, except with probability
1e-6 over the start vector whatever the spectrum; or at step `n` (exact), or
at an invariant subspace. Matrices with `n <= 125` are solved exactly.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora._validation import check_positive_int
from keras_adaptive_lora.core.kernel_view import base_layer, is_projection
from keras_adaptive_lora.core.quantization import kernel_matrix
from keras_adaptive_lora.spectral.lanczos import top_eigenvalue

#: The `ε` of FlexLoRA's importance score (paper eq. 3).
ENTROPY_EPS = 1e-12

#: `||W||_F` must lie in `[2**_SAFE_LOW, 2**_SAFE_HIGH]` for `W` to be used as
#: it is (the scale `1 / ||W||_F` is applied to the products, in float64):
#: float32 squares and Gram products then neither overflow nor underflow.
#: Otherwise `W` is first divided by its largest absolute entry.
_SAFE_LOW, _SAFE_HIGH = -30, 40

#: The largest Gram side `n` formed explicitly (float32, 64 MiB at 4096).
_GRAM_MAX_DIM = 4096


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
    sigma1_sq, steps, certified = top_eigenvalue(apply, n, float(tol), max_steps)
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


def truncated_factors(matrix, rank):
    """The best rank-`rank` factors of `matrix` (SVD, Eckart-Young):
    `(a (d_in, k), b (k, d_out), error)` with `a` orthonormal columns, the
    singular values in `b`, `k = min(rank, min(d_in, d_out))`, and the
    relative Frobenius error `||M - a b|| / ||M||` (0.0 for a zero matrix)."""
    rank = check_positive_int("svd_rank", rank)
    u, s, vt = np.linalg.svd(np.asarray(matrix, "float64"), full_matrices=False)
    total = float(np.sqrt(np.sum(s**2)))
    error = float(np.sqrt(np.sum(s[rank:] ** 2))) / total if total > 0 else 0.0
    a, b = u[:, :rank], s[:rank, None] * vt[:rank]
    return a.astype("float32"), b.astype("float32"), error

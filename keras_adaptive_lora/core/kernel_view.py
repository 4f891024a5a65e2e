"""The matrix view of a projection kernel.

A projection maps `x (..., d_in) -> y (..., d_out)`. A `Dense` kernel is that
`(d_in, d_out)` matrix; an `EinsumDense` kernel is viewed as one by putting
its contracted axes first and its produced axes last (`KernelView`). Every
rank, stable rank and factorization in this library is of this matrix view,
never of a kernel slice (docs/methods.md).
"""

import string

import keras
import numpy as np
from keras import ops

#: The layer types adapters wrap.
PROJECTION_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)


def is_projection(layer):
    """Whether `layer` is a `Dense` or an `EinsumDense`."""
    return isinstance(layer, PROJECTION_TYPES)


def base_layer(layer):
    """The projection itself: an adapter's wrapped layer, or `layer`."""
    wrapped = getattr(layer, "wrapped", None)
    return wrapped if is_projection(wrapped) else layer


class KernelView:
    """How a projection kernel maps to a `(d_in, d_out)` matrix.

    For an `EinsumDense` with equation `lhs,ker->out`, kernel axes whose letter
    is in `lhs` but not in `out` are contracted: together they form `d_in`.
    Kernel axes whose letter is in `out` but not in `lhs` are produced: they
    form `d_out`. A `Dense` kernel is already `(d_in, d_out)`. The matrix view
    is the kernel transposed to (contracted axes, produced axes) and reshaped.

    Args:
        equation: the einsum equation, or `None` for a `Dense` kernel.
        kernel_shape: the kernel's shape.
        layer_name: used in error messages.
    """

    def __init__(self, equation, kernel_shape, layer_name="layer"):
        self.equation = equation
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        if equation is None:
            if len(self.kernel_shape) != 2:
                raise ValueError(
                    f"Layer '{layer_name}': a Dense kernel must be 2-D, got "
                    f"shape {self.kernel_shape}."
                )
            self.in_axes, self.out_axes = (0,), (1,)
        else:
            self._parse(equation, layer_name)
        self.in_dims = tuple(self.kernel_shape[i] for i in self.in_axes)
        self.out_dims = tuple(self.kernel_shape[i] for i in self.out_axes)
        self.d_in = int(np.prod(self.in_dims))
        self.d_out = int(np.prod(self.out_dims))
        self.perm = self.in_axes + self.out_axes
        self.inverse_perm = tuple(int(i) for i in np.argsort(self.perm))

    def _parse(self, equation, layer_name):
        eq = equation.replace(" ", "")
        try:
            inputs, out = eq.split("->")
            lhs, ker = inputs.split(",")
        except ValueError:
            raise ValueError(
                f"Layer '{layer_name}': cannot parse einsum equation "
                f"'{equation}'; expected the form 'lhs,kernel->output'."
            ) from None
        if "." in ker:
            raise ValueError(
                f"Layer '{layer_name}': equation '{equation}' has an ellipsis "
                "in the kernel spec; an adapter needs named kernel axes."
            )
        if len(ker) != len(self.kernel_shape):
            raise ValueError(
                f"Layer '{layer_name}': kernel spec '{ker}' of equation "
                f"'{equation}' does not match kernel shape {self.kernel_shape}."
            )
        in_axes, out_axes = [], []
        for axis, letter in enumerate(ker):
            in_lhs, in_out = letter in lhs, letter in out
            if in_lhs and not in_out:
                in_axes.append(axis)
            elif in_out and not in_lhs:
                out_axes.append(axis)
            else:
                where = "both the input and the output" if in_lhs else (
                    "neither the input nor the output"
                )
                raise ValueError(
                    f"Layer '{layer_name}': kernel axis '{letter}' of equation "
                    f"'{equation}' appears in {where}, so the kernel is not a "
                    "single linear map from input features to output "
                    "features and cannot be viewed as a (d_in, d_out) matrix. "
                    "Exclude this layer from the adapter targets."
                )
        if not in_axes or not out_axes:
            raise ValueError(
                f"Layer '{layer_name}': equation '{equation}' has no "
                f"{'contracted' if not in_axes else 'produced'} kernel axis; "
                "it cannot be viewed as a (d_in, d_out) matrix."
            )
        self.in_axes, self.out_axes = tuple(in_axes), tuple(out_axes)
        used = set(eq)
        z = next(c for c in string.ascii_letters if c not in used)
        in_letters = "".join(ker[i] for i in in_axes)
        out_letters = "".join(ker[i] for i in out_axes)
        # Letters of the input kept in the output (batch, sequence, ...).
        mid = "".join(c for c in lhs if c == "." or c in out)
        self.down_equation = f"{lhs},{in_letters}{z}->{mid}{z}"
        self.up_equation = f"{mid}{z},{z}{out_letters}->{out}"
        # Plain matmuls (plus reshapes of trailing axes) where the einsum is
        # one: true for every keras-hub projection, and faster on torch.
        self._down_is_matmul = mid + in_letters == lhs
        self._up_is_matmul = mid + out_letters == out

    # Factored products -----------------------------------------------------
    def down(self, x, a):
        """`x` (layer input) times `a` of shape `(d_in, r)`."""
        if self.equation is None:
            return ops.matmul(x, a)
        if self._down_is_matmul:
            if len(self.in_axes) > 1:
                x = ops.reshape(x, tuple(ops.shape(x)[: -len(self.in_axes)]) + (self.d_in,))
            return ops.matmul(x, a)
        a = ops.reshape(a, self.in_dims + (a.shape[-1],))
        return ops.einsum(self.down_equation, x, a)

    def up(self, h, b):
        """`h` (output of `down`) times `b` of shape `(r, d_out)`."""
        if self.equation is None:
            return ops.matmul(h, b)
        if self._up_is_matmul:
            y = ops.matmul(h, b)
            if len(self.out_axes) > 1:
                y = ops.reshape(y, tuple(ops.shape(h)[:-1]) + self.out_dims)
            return y
        b = ops.reshape(b, (b.shape[0],) + self.out_dims)
        return ops.einsum(self.up_equation, h, b)

    def project(self, x, kernel):
        """`x` times a full kernel in the layer's own shape (no bias)."""
        if self.equation is None:
            return ops.matmul(x, kernel)
        return ops.einsum(self.equation, x, kernel)

    # Conversions -------------------------------------------------------------
    def to_matrix(self, kernel):
        """Kernel (layer shape) -> `(d_in, d_out)` matrix."""
        return ops.reshape(ops.transpose(kernel, self.perm), (self.d_in, self.d_out))

    def from_matrix(self, matrix):
        """`(d_in, d_out)` matrix -> kernel in the layer's own shape."""
        shaped = ops.reshape(matrix, self.in_dims + self.out_dims)
        return ops.transpose(shaped, self.inverse_perm)


class MatrixIO:
    """A layer's input (`side=0`) and output (`side=1`) as rows `(tokens, d_in | d_out)`
    of its `KernelView` (for ops that work on the matrix view, e.g. LR-LoRA's merged
    projection); refuses equations that sum over input axes outside the kernel."""

    def __init__(self, view, layer_name):
        self.view, equation = view, view.equation or "...i,io->...o"
        inputs, out = equation.replace(" ", "").split("->")
        lhs, ker = inputs.split(",")
        lost = sorted(set(lhs) - set(out) - set(ker) - {"."})
        if lost:
            raise ValueError(
                f"Layer '{layer_name}': equation '{equation}' sums over input axes {lost} that are in "
                "neither the kernel nor the output, so its input has no row view of size d_in "
                "(SincLoRA's merged projection needs one). Exclude this layer from the targets."
            )
        mid = "".join(c for c in lhs if c == "." or c in out)
        self.spec = (lhs, out, mid) + tuple("".join(ker[i] for i in a) for a in (view.in_axes, view.out_axes))

    def rows(self, x, side):
        """`(rows, token axes' shape)`."""
        source, mid, letters = self.spec[side], self.spec[2], self.spec[3 + side]
        if source != mid + letters:
            x = ops.einsum(f"{source}->{mid}{letters}", x)
        return ops.reshape(x, (-1, (self.view.d_in, self.view.d_out)[side])), tuple(ops.shape(x)[: len(x.shape) - len(letters)])

    def unrows(self, rows, tokens, side):
        """The inverse of `rows`."""
        target, mid, letters = self.spec[side], self.spec[2], self.spec[3 + side]
        y = ops.reshape(rows, tokens + (self.view.in_dims, self.view.out_dims)[side])
        return y if target == mid + letters else ops.einsum(f"{mid}{letters}->{target}", y)


def kernel_view(layer):
    """The `KernelView` of a `Dense`/`EinsumDense` layer or adapter."""
    view = getattr(layer, "view", None)
    if isinstance(view, KernelView) and is_projection(getattr(layer, "wrapped", None)):
        return view
    if not is_projection(layer):
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' is a "
            f"{type(layer).__name__}; only keras.layers.Dense and "
            "keras.layers.EinsumDense projections can be adapted."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built yet, so its kernel shape is "
            "unknown. Build it first (call the model on an example batch or "
            "`layer.build(input_shape)`), then wrap it."
        )
    equation = layer.equation if isinstance(layer, keras.layers.EinsumDense) else None
    return KernelView(equation, layer.kernel.shape, layer.name)


def check_rank(layer, rank, what="rank"):
    """Raise a `ValueError` naming the layer unless `1 <= rank <= min(d_in, d_out)`."""
    view = kernel_view(layer)
    limit = min(view.d_in, view.d_out)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"Layer '{layer.name}': {what}={rank} is out of range; its kernel "
            f"is a ({view.d_in}, {view.d_out}) matrix, so the {what} must be "
            f"between 1 and min(d_in, d_out) = {limit}."
        )

"""SincLoRA's merged-weight projection `x (W + s f(A B))` as one
custom-gradient op that keeps nothing kernel-sized for the backward pass,
working on row blocks of the kernel's matrix view (`Projection`).
"""

import string

from keras import ops

from keras_adaptive_lora import backend
from keras_adaptive_lora.methods.sinc.transfer import (
    Coefficients,
    flat,
    transfer_terms,
    transfer_values,
    upstream_of,
)


def data_dependency(x):
    """A float32 zero computed from `x`'s data (graph backends; see `merged_projection`)."""
    first = ops.reshape(ops.slice(flat(x), (0,), (1,)), ())
    return ops.multiply(ops.cast(ops.isnan(first), "float32"), 0.0)




class Projection:
    """`y = x K` for a layer's equation, and the products of the backward
    pass with one row block of the kernel's matrix view at a time.

    A block is a slice of the kernel along its first contracted axis
    (`view.in_axes[0]`): `length` indices there are `length · rest`
    consecutive rows of the `(d_in, d_out)` matrix view.
    """

    def __init__(self, view, layer_name):
        self.view = view
        self.axis = view.in_axes[0]
        self.size = view.kernel_shape[self.axis]
        self.rest = view.d_in // self.size
        self.identity = view.perm == tuple(range(len(view.perm)))
        if view.equation is None:
            return
        inputs, self.out = view.equation.replace(" ", "").split("->")
        self.lhs, self.ker = inputs.split(",")
        lost = sorted(set(self.lhs) - set(self.out) - set(self.ker) - {"."})
        if lost:
            raise ValueError(
                f"Layer '{layer_name}': equation '{view.equation}' sums over input "
                f"axes {lost} that are in neither the kernel nor the output; "
                "SincLoRA's merged-weight backward pass does not support such "
                "equations. Exclude this layer from the targets."
            )

    def block_length(self):
        """Indices along the block axis per row block (about `backend.BLOCK_ELEMENTS` entries)."""
        return max(1, backend.BLOCK_ELEMENTS // (self.rest * self.view.d_out))

    def _explicit(self, ndim):
        """The equation's specs with any ellipsis spelled out for an input of rank `ndim`."""
        lhs, ker, out = self.lhs, self.ker, self.out
        if "..." in lhs:
            used = set(lhs + ker + out)
            free = [c for c in string.ascii_letters if c not in used]
            fill = "".join(free[: ndim - (len(lhs) - 3)])
            lhs, out = lhs.replace("...", fill), out.replace("...", fill)
        return lhs, ker, out

    def input_axis(self, ndim):
        """The axis of the layer input that the block axis contracts with."""
        if self.view.equation is None:
            return ndim - 1
        lhs, ker, _ = self._explicit(ndim)
        return lhs.index(ker[self.axis])

    def to_kernel(self, rows, length):
        """Matrix-view rows `(length · rest, d_out)` -> the kernel block (layer layout)."""
        view = self.view
        shaped = ops.reshape(rows, (length,) + view.in_dims[1:] + view.out_dims)
        return shaped if self.identity else ops.transpose(shaped, view.inverse_perm)

    def forward(self, x, kernel):
        return self.view.project(x, kernel)

    def grad_input(self, x, kernel, upstream):
        """`d sum(upstream · y) / dx` for a full kernel."""
        if self.view.equation is None:
            return backend.matmul_transposed(upstream, kernel)
        lhs, ker, out = self._explicit(len(x.shape))
        return ops.einsum(f"{out},{ker}->{lhs}", upstream, kernel)

    def grad_input_block(self, x, upstream, block):
        """The part of `dL/dx` through a kernel block: `length` entries of the input axis."""
        if self.view.equation is None:
            g2 = ops.reshape(upstream, (-1, self.view.d_out))
            piece = ops.matmul(g2, ops.transpose(block))
            return ops.reshape(piece, tuple(ops.shape(x)[:-1]) + (int(block.shape[0]),))
        lhs, ker, out = self._explicit(len(x.shape))
        return ops.einsum(f"{out},{ker}->{lhs}", upstream, block)

    def grad_kernel_block(self, x, upstream, start, length):
        """Rows of `dL/dK` (matrix view) for the block at `start`: `(length · rest, d_out)`."""
        view = self.view
        if view.equation is None:
            x2 = backend.take_block(ops.reshape(x, (-1, view.d_in)), 1, start, length)
            g2 = ops.reshape(upstream, (-1, view.d_out))
            return ops.matmul(ops.transpose(x2), g2)
        lhs, ker, out = self._explicit(len(x.shape))
        block = ops.einsum(f"{lhs},{out}->{ker}", backend.take_block(x, lhs.index(ker[self.axis]), start, length), upstream)
        if not self.identity:
            block = ops.transpose(block, view.perm)
        return ops.reshape(block, (length * self.rest, view.d_out))




def merged_projection(projection, grid, scale, compute_dtype, inputs, kernel, lora_a, lora_b, amplitudes, bandwidths):
    """`x (W + s f(A B))` as one custom-gradient op that keeps nothing kernel-sized.

    Row blocks of the kernel's matrix view (`Projection`); the scale `s`
    is folded into the amplitudes. Forward: each block's `A_r B` and `f`
    are block-sized; `ΔW_r` is added into the merged kernel, which on jax
    is the only kernel-sized buffer (written in place over a copy of `W`);
    on tensorflow the loop scatters the blocks into a copy of `W`
    (`backend.BlockOutput.update`); on torch the blocks `W_r + ΔW_r` are concatenated
    once (two kernels for that moment). Backward: per block `G_r = dL/dΔW_r`,
    `A_r B`, `f`, `f'` and `ΔW_r` (all block-sized) give `dL/dA_r`,
    `dL/dB`, the transfer parameters' gradients and the block's share of
    `dL/dx`: on jax `g ΔW_rᵀ`, added in place onto `g Wᵀ` (the frozen
    kernel: no merged one, and no kernel read inside a loop, which XLA
    would copy when the kernel is a compile-time constant); elsewhere
    `g (W_r + ΔW_r)ᵀ`, the pieces written into zeros (tensorflow) or
    concatenated once (torch; adding `g Wᵀ` afterwards would hold a third
    input-sized buffer).
    """
    rows = projection.rest
    rank = int(lora_a.shape[1])
    shape = (projection.view.d_in, rank), (rank, projection.view.d_out)

    @ops.custom_gradient
    def project(x, kernel, lora_a, lora_b, amplitudes, bandwidths):
        coef = Coefficients(grid, ops.multiply(amplitudes, scale), bandwidths)
        step = projection.block_length()
        in_place = backend.merges_in_place()

        def product_rows(start, length):
            a_r = backend.take_block(lora_a, 0, start * rows, length * rows)
            return a_r, ops.matmul(a_r, lora_b)

        def grad(*args, upstream=None):
            upstream = upstream_of(args, upstream)

            def block(start, length):
                a_r, product = product_rows(start, length)
                g_r = ops.cast(projection.grad_kernel_block(x, upstream, start, length), "float32")
                value, slope, grad_a, grad_b = transfer_terms(flat(product), flat(g_r), coef, True)
                grad_product = ops.multiply(g_r, ops.reshape(slope, product.shape))
                del g_r, slope
                delta = projection.to_kernel(ops.reshape(value, product.shape), length)
                del value
                if not in_place:
                    delta = ops.add(ops.cast(backend.take_block(kernel, projection.axis, start, length), "float32"), delta)
                grad_x = projection.grad_input_block(x, upstream, ops.cast(delta, compute_dtype))
                return (
                    (ops.matmul(grad_product, ops.transpose(lora_b)), grad_x),
                    (ops.matmul(ops.transpose(a_r), grad_product), grad_a, grad_b),
                )

            x_axis = projection.input_axis(len(x.shape))
            if in_place:
                # dL/dx through the frozen kernel; each block adds g ΔW_rᵀ.
                base = projection.grad_input(x, ops.cast(kernel, compute_dtype), upstream)
                grad_x = backend.BlockOutput(tuple(x.shape), x_axis, init=base, dtype=base.dtype)
            else:
                grad_x = backend.BlockOutput(tuple(x.shape), x_axis, like=x)
            outputs = (backend.BlockOutput(shape[0], 0, unit=rows), grad_x)
            sums = (shape[1], (coef.size,), (coef.size,))
            (grad_a, grad_x), (grad_b, grad_amplitudes, grad_bandwidths) = backend.blocked(
                projection.size, step, block, outputs, sums
            )
            grad_amplitudes = ops.multiply(grad_amplitudes, scale)
            return ops.cast(grad_x, x.dtype), None, grad_a, grad_b, grad_amplitudes, grad_bandwidths

        def block(start, length):
            _, product = product_rows(start, length)
            value = transfer_values(flat(product), coef)
            return (projection.to_kernel(ops.reshape(value, product.shape), length),), ()

        merged = ops.cast(kernel, "float32")
        if backend.orders_after_input():
            # A zero computed from x makes this layer's merged-kernel loop
            # wait for its input (see `backend.orders_after_input`); on jax
            # the add is fused into the copy of W the loop writes into anyway.
            merged = ops.add(merged, data_dependency(x))
        (merged,), _ = backend.blocked(
            projection.size, step, block, (backend.BlockOutput(tuple(kernel.shape), projection.axis, init=merged),)
        )
        return projection.forward(x, ops.cast(merged, compute_dtype)), grad

    return project(inputs, kernel, lora_a, lora_b, amplitudes, bandwidths)


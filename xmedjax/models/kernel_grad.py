"""Convolutions as matrix products where XLA:CPU's own are slow (issue 14: CPU speed).

XLA:CPU computes the kernel gradient of a convolution as another convolution with batch and
features swapped, after physically transposing the activation and the output gradient to
[C, H, W, N]: on ResNet50's train step those kernel gradients and their transposes were half
of the time (benchmarks/NOTES.md, "CPU profile"). For a 1x1 convolution the kernel gradient
is one matrix product, x^T g over the N*H*W rows of the NHWC activation (strided: of its
subsampled rows). A 1x1 convolution without padding is also a matrix product forward ([N*H*W, Cin] x
[Cin, Cout], `MATMUL_1X1_FORWARD`), and its input gradient then the product's transpose.
`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (nnx.Conv's
`conv_general_dilated` argument) that does this:

- a 1x1 convolution's output differs from lax's by float rounding only (the sums run in
  another order: the torchvision goldens hold at their 1e-4);
- a 3x3, stride-1 convolution with at most a third as many output as input channels
  (DenseNet121's 128 -> 32, at 14x14 and more) runs forward as one product of the padded
  input with all nine taps' kernels, then nine shifted sums (`taps_forward`; DenseNet121's
  eval step 13-17% faster, benchmarks/NOTES.md "Phase 4"), its output equal to lax's up to
  rounding, its input gradient XLA's own and its kernel gradient XLA's own or, where the
  next rule takes it, the shifted product; every other forward is the very same
  `lax.conv_general_dilated` call, bit for bit;
- a 3x3, stride-1, padding-1 convolution with at least `SHIFTED_MIN_ROWS` output rows
  (ResNet50's at 56x56, batch 8), or `NINE_SHIFTS_MIN_ROWS` with fewer output than input
  channels (DenseNet121's at 56x56 and 28x28) has as kernel gradient products of the
  padded input's rows with copies of the output gradient shifted by the taps' row offsets
  (`shifted_kernel_gradient`, benchmarks/NOTES.md "Phase 6" and "Phase 11"); its forward
  stays lax's own, bit for bit;
- a 3x3 convolution with at least 64 output channels and `TAP_KERNEL_GRAD_MIN_ROWS` output
  rows that the rule above does not take (ResNet50's 128 -> 128 layers at batch 8) has as
  kernel gradient one product per kernel tap (`kernel_gradient`), its forward lax's own;
- the stem, a 7x7 stride-2 padding-3 convolution on 1-4 channels, with at least
  `SPACE_TO_DEPTH_MIN_ROWS` output rows (ResNet50's and DenseNet121's at 128 px and more,
  batch 8) has as kernel gradient products over the input cut into 2x2 blocks
  (`space_to_depth_kernel_gradient`; 38 ms against XLA's 52 at 224 px, benchmarks/NOTES.md
  "Phase 11"), its forward and input gradient lax's own;
- the input gradient of a k x k convolution is XLA's own (the transpose of the forward);
- the kernel gradient differs from XLA's by float rounding only.

Every other convolution is plain `lax.conv_general_dilated`: smaller 3x3 and 7x7 kernels
(there XLA's own kernel gradient measured as fast as or faster than one product per kernel
tap, which `kernel_gradient` also computes; `benchmarks/cpu_kernels.py` times both),
dilation, groups, other layouts, and every convolution on a GPU or TPU (`MATMUL_BACKENDS` is
the CPU only: the products were never measured against cuDNN or the TPU's convolutions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from xmedjax.models import barrier

MATMUL_BACKENDS = ("cpu",)  # where the products were measured faster (benchmarks/NOTES.md)
# A 1x1 convolution without padding as a matrix product forward too ([N*H*W, Cin] x
# [Cin, Cout] over the strided rows); its input gradient is then the product's transpose.
MATMUL_1X1_FORWARD = True
# A 3x3 stride-1 convolution with few output channels (DenseNet121's 128 -> 32) as one product
# with all nine taps' outputs, then nine shifted sums (`taps_forward`); see `uses_taps_forward`.
TAPS_3X3_FORWARD = True
# The kernel gradient of a 3x3 stride-1 padding-1 convolution as products with the output
# gradient shifted by the taps' offsets (`shifted_kernel_gradient`); see
# `uses_shifted_kernel_grad`.
SHIFTED_3X3_KERNEL_GRAD = True
# ... from this many output rows (N*H*W) on: below it XLA's own was as fast or faster, above
# it XLA's fell off a cliff (2-4x slower) on every shape timed (benchmarks/NOTES.md, "Phase 6").
SHIFTED_MIN_ROWS = 16384
# ... and from this many with fewer output than input channels (`_nine_shifts`): DenseNet121's
# 128 -> 32 layers at 28x28 too (batch 8), its train step 1.067 -> 1.048 s against 16384
# ("Phase 11"; ResNet50 has no such layer). At 1568 (14x14 too) it ran 1-2% faster again, but
# its XLA compile took 1.1 s longer.
NINE_SHIFTS_MIN_ROWS = 6272
# A kernel gradient contracts the rows (N*H*W) of both its operands: a product whose left
# operand is transposed, which this jaxlib's YNNPACK refuses, so XLA's own dot runs it at
# 110-190 GFLOP/s (benchmarks/NOTES.md, "Phase 12", item 6). Where several products share g,
# g is transposed into a buffer once ([Cout, rows]) and each product is a plain one, which
# YNNPACK runs: the nine shifts then stand one above the other ([9*Cout, rows],
# `_nine_shifts_transposed`: DenseNet121's train step 5-7% faster, "Phase 13"), and
# `kernel_gradient`'s per-tap products read the one transposed g (ResNet50's 0.5%). A lone
# product (1x1 kernels, DenseNet121's 2% slower) or the stem's, whose g is 27 MB (2% slower),
# costs more to transpose than it gains.
TRANSPOSED_NINE_SHIFTS = True
TRANSPOSED_ROW_PRODUCTS = True
# The kernel gradient of a 3x3 convolution with at least 64 output channels and this many
# output rows (N*Ho*Wo) as one product per kernel tap (`kernel_gradient`), where the shifted
# product does not take it: ResNet50's 128 -> 128 layers at batch 8, 15-16 ms against XLA's
# 24-30 ms (benchmarks/NOTES.md, "Phase 6"); see `uses_tap_kernel_grad`.
TAP_KERNEL_GRAD_MIN_ROWS = 6272
# The kernel gradient of the 7x7 stride-2 stem on 1-4 channels as products over the input in
# space-to-depth form, from this many output rows on (`uses_space_to_depth_kernel_grad`;
# None: XLA's own): at 224 px, batch 8 (100,352 rows) 38 ms against XLA's 52, at 128 px 12
# against 16, at 64 px (8,192 rows) 3.1 against 2.8 (benchmarks/NOTES.md, "Phase 11").
SPACE_TO_DEPTH_MIN_ROWS = 16384
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _is_unit(values) -> bool:
    return values is None or all(int(v) == 1 for v in values)


def _dimension_numbers(lhs_shape, rhs_shape, dimension_numbers):
    if dimension_numbers is None or isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)


def _plain_nhwc_2d(
    rhs_shape: Sequence[int],
    padding,
    dimension_numbers,
    *,
    lhs_shape: Sequence[int] = (0, 0, 0, 0),
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> bool:
    """A 2-D NHWC/HWIO convolution with explicit padding, no dilation and no groups, on a
    backend of `MATMUL_BACKENDS`: what both rewrites below require."""
    if jax.default_backend() not in MATMUL_BACKENDS:
        return False
    if len(rhs_shape) != 4 or isinstance(padding, str):
        return False
    dn = _dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    if dn != NHWC or feature_group_count != 1 or batch_group_count != 1:
        return False
    return _is_unit(lhs_dilation) and _is_unit(rhs_dilation)


def uses_matmul_kernel_grad(rhs_shape: Sequence[int], padding, dimension_numbers, **layout) -> bool:
    """Whether `conv_general_dilated` takes the matrix-product kernel gradient for this call:
    a 2-D NHWC/HWIO convolution with a 1x1 kernel, explicit padding, no dilation, no
    groups, on a backend of `MATMUL_BACKENDS` (`layout`: `_plain_nhwc_2d`'s keywords)."""
    plain_2d = _plain_nhwc_2d(rhs_shape, padding, dimension_numbers, **layout)
    return plain_2d and tuple(rhs_shape[:2]) == (1, 1)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    **sharding,
) -> jax.Array:
    """`lax.conv_general_dilated` (same arguments) with the matrix products where
    `uses_matmul_kernel_grad` says so; an explicit `out_sharding` takes the plain
    convolution."""
    plain = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **{k: v for k, v in sharding.items() if v is not None},
    )
    if any(v is not None for v in sharding.values()):
        return plain(lhs, rhs)
    layout = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    if uses_taps_forward(
        lhs.shape,
        rhs.shape,
        window_strides,
        padding,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **layout,
    ):
        return _conv_taps(lhs, rhs)
    if uses_shifted_kernel_grad(
        lhs.shape,
        rhs.shape,
        window_strides,
        padding,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **layout,
    ):
        return _conv_3x3(lhs, rhs)
    products = any(
        rule(
            lhs.shape,
            rhs.shape,
            window_strides,
            padding,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **layout,
        )
        for rule in (uses_tap_kernel_grad, uses_space_to_depth_kernel_grad)
    )
    if not products and not uses_matmul_kernel_grad(
        rhs.shape, padding, dimension_numbers, lhs_shape=lhs.shape, **layout
    ):
        return plain(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision, preferred_element_type)


def _default_3x3(lhs_shape, rhs_shape, padding, dimension_numbers, precisions, layout) -> bool:
    """A 4-D NHWC/HWIO 3x3 convolution at default precision and output type (`precisions`:
    both None) that `_plain_nhwc_2d` takes: what the 3x3 rules below share."""
    if len(lhs_shape) != 4 or any(p is not None for p in precisions):
        return False
    if not _plain_nhwc_2d(rhs_shape, padding, dimension_numbers, lhs_shape=lhs_shape, **layout):
        return False
    return tuple(int(d) for d in rhs_shape[:2]) == (3, 3)


def uses_taps_forward(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides,
    padding,
    dimension_numbers,
    *,
    precision=None,
    preferred_element_type=None,
    **layout,
) -> bool:
    """Whether `conv_general_dilated` computes this forward by `taps_forward`: an NHWC/HWIO
    3x3 convolution, stride 1, padding 1, no dilation or groups, default precision, at
    least 14x14, with at most a third as many output as input channels, on a backend of
    `MATMUL_BACKENDS` (`layout`: `_plain_nhwc_2d`'s keywords but `lhs_shape`)."""
    if not TAPS_3X3_FORWARD or not _is_unit(window_strides):
        return False
    precisions = (precision, preferred_element_type)
    default = _default_3x3(lhs_shape, rhs_shape, padding, dimension_numbers, precisions, layout)
    if not default:
        return False
    _, _, cin, cout = (int(d) for d in rhs_shape)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return pads == ((1, 1), (1, 1)) and 3 * cout <= cin and min(lhs_shape[1], lhs_shape[2]) >= 14


def uses_shifted_kernel_grad(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides,
    padding,
    dimension_numbers,
    *,
    precision=None,
    preferred_element_type=None,
    **layout,
) -> bool:
    """Whether this convolution's kernel gradient is `shifted_kernel_gradient` (whether
    `taps_forward` or lax's runs it forward): an NHWC/HWIO 3x3 convolution, stride 1,
    padding 1, no dilation or groups, default precision, with at least `SHIFTED_MIN_ROWS`
    output rows (N*H*W; `NINE_SHIFTS_MIN_ROWS` with fewer output than input channels), on
    a backend of `MATMUL_BACKENDS` (`layout`: `_plain_nhwc_2d`'s keywords but `lhs_shape`).
    """
    if not SHIFTED_3X3_KERNEL_GRAD or not _is_unit(window_strides):
        return False
    precisions = (precision, preferred_element_type)
    default = _default_3x3(lhs_shape, rhs_shape, padding, dimension_numbers, precisions, layout)
    if not default:
        return False
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    rows = int(lhs_shape[0]) * int(lhs_shape[1]) * int(lhs_shape[2])
    fewer_out = int(rhs_shape[3]) < int(rhs_shape[2])
    return pads == ((1, 1), (1, 1)) and rows >= (
        NINE_SHIFTS_MIN_ROWS if fewer_out else SHIFTED_MIN_ROWS
    )


def uses_tap_kernel_grad(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides,
    padding,
    dimension_numbers,
    *,
    precision=None,
    preferred_element_type=None,
    **layout,
) -> bool:
    """Whether this convolution's kernel gradient is `kernel_gradient`'s one product per tap
    (its forward lax's own): an NHWC/HWIO 3x3 convolution with at least 64 output channels
    and `TAP_KERNEL_GRAD_MIN_ROWS` output rows (N*Ho*Wo), any stride, default precision, on
    a backend of `MATMUL_BACKENDS`, that `uses_shifted_kernel_grad` does not take."""
    if TAP_KERNEL_GRAD_MIN_ROWS is None:
        return False
    precisions = (precision, preferred_element_type)
    default = _default_3x3(lhs_shape, rhs_shape, padding, dimension_numbers, precisions, layout)
    if not default or int(rhs_shape[3]) < 64:
        return False
    if uses_shifted_kernel_grad(
        lhs_shape, rhs_shape, window_strides, padding, dimension_numbers, **layout
    ):
        return False
    out = [
        (int(lhs_shape[1 + i]) + int(lo) + int(hi) - 3) // int(stride) + 1
        for i, ((lo, hi), stride) in enumerate(zip(padding, window_strides))
    ]
    return int(lhs_shape[0]) * out[0] * out[1] >= TAP_KERNEL_GRAD_MIN_ROWS


def uses_space_to_depth_kernel_grad(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides,
    padding,
    dimension_numbers,
    *,
    precision=None,
    preferred_element_type=None,
    **layout,
) -> bool:
    """Whether this convolution's kernel gradient is `space_to_depth_kernel_gradient` (its
    forward and input gradient lax's own): an NHWC/HWIO 7x7 convolution, stride 2, padding
    3, with at most 4 input channels (the stem of ResNet50 and DenseNet121 on 1- or
    3-channel images) and at least `SPACE_TO_DEPTH_MIN_ROWS` output rows (N*Ho*Wo), default
    precision, on a backend of `MATMUL_BACKENDS`."""
    if SPACE_TO_DEPTH_MIN_ROWS is None or len(lhs_shape) != 4:
        return False
    if precision is not None or preferred_element_type is not None:
        return False
    if not _plain_nhwc_2d(rhs_shape, padding, dimension_numbers, lhs_shape=lhs_shape, **layout):
        return False
    if tuple(int(d) for d in rhs_shape[:2]) != (7, 7) or int(rhs_shape[2]) > 4:
        return False
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if tuple(int(s) for s in window_strides) != (2, 2) or pads != ((3, 3), (3, 3)):
        return False
    out = [(int(lhs_shape[1 + i]) + 2 * 3 - 7) // 2 + 1 for i in range(2)]  # padding 3, k 7
    return int(lhs_shape[0]) * out[0] * out[1] >= SPACE_TO_DEPTH_MIN_ROWS


def shifted_kernel_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """d(sum(g * conv(x, w)))/dw for a 3x3, stride-1, padding-1 NHWC/HWIO convolution, as
    products over the rows of the padded input ([N*(H+2)*(W+2), Cin]).

    With g laid on the same padded grid (zeros on its last two rows and columns) and both
    flattened to rows, tap (dy, dx) pairs row r of the input with row r - dy*(W+2) - dx of
    g, and every pair that would cross a row or an image edge meets one of g's zeros. So
    each tap's kernel gradient is one product of x's rows with g's rows shifted by the
    tap's offset: XLA:CPU's own kernel gradient of these convolutions ran 2.2-2.8x slower
    than oneDNN's (benchmarks/NOTES.md, "Phase 5"). Which operand is shifted follows the
    channels, each way measured on the train step of the model that has it ("Phase 11"):
    with at least as many output channels as input (ResNet50's 64 -> 64), three row
    windows of x against g shifted by 0, 1 and 2 rows side by side (`_row_windows`: steps
    2% faster than the other way); with fewer (DenseNet121's 128 -> 32), g shifted nine
    times against x (`_nine_shifts`: steps 3.5% faster than row windows), channel-major
    where `TRANSPOSED_NINE_SHIFTS` (`_nine_shifts_transposed`)."""
    cin, cout = x.shape[-1], g.shape[-1]
    if cin <= cout:
        return _row_windows(x, g)
    return _nine_shifts_transposed(x, g) if TRANSPOSED_NINE_SHIFTS else _nine_shifts(x, g)


def _grid_rows(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x padded by one pixel on every side and g by two after its last row and column, both
    flattened to rows of that (H+2) x (W+2) grid: ([N*(H+2)*(W+2), Cin], [..., Cout])."""
    n, h, wd, _ = x.shape
    rows = n * (h + 2) * (wd + 2)
    x_rows = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(rows, x.shape[-1])
    g_rows = jnp.pad(g, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(rows, g.shape[-1])
    return x_rows, g_rows


def _tap_offset(tap: int, width: int) -> int:
    """Tap (tap // 3, tap % 3)'s offset in rows of the padded grid of an image `width` wide."""
    return (tap // 3) * (width + 2) + tap % 3


def _nine_shifts_transposed(x: jax.Array, g: jax.Array) -> jax.Array:
    """`_nine_shifts`' product with the shifted copies channel-major: [g shifted by each
    tap's offset, one above the other] ([9*Cout, rows]) times x's rows ([rows, Cin]), a
    plain product. g is transposed into a buffer of its own first (left to itself, XLA
    fuses the transpose into each of the nine copies); each shift is then a contiguous run
    of every channel's row, and the result is transposed back after the reshape (a product's
    own transpose XLA folds into the product, which would contract x's rows again)."""
    cin, cout, wd = x.shape[-1], g.shape[-1], x.shape[2]
    x_rows, g_rows = _grid_rows(x, g)
    rows = x_rows.shape[0]
    reach = _tap_offset(8, wd)  # the largest tap offset
    g_cols = jnp.pad(barrier.materialise(g_rows.T), ((0, 0), (reach, 0)))
    shifted = jnp.zeros((9 * cout, rows), g.dtype)
    for tap in range(9):
        offset = _tap_offset(tap, wd)
        part = lax.slice_in_dim(g_cols, reach - offset, reach - offset + rows, axis=1)
        shifted = lax.dynamic_update_slice(shifted, part, (tap * cout, 0))
    accumulate = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    dw = lax.dot_general(
        shifted, x_rows, (((1,), (0,)), ((), ())), preferred_element_type=accumulate
    )
    return dw.reshape(3, 3, cout, cin).transpose(0, 1, 3, 2).astype(x.dtype)


def _nine_shifts(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T [g shifted by each of the nine taps' offsets, side by side]: one product. The
    shifted copies are written into one buffer slice by slice (a concatenation of such
    narrow pieces ran at ~1 GB/s)."""
    cin, cout, wd = x.shape[-1], g.shape[-1], x.shape[2]
    x_rows, g_rows = _grid_rows(x, g)
    rows = x_rows.shape[0]
    reach = _tap_offset(8, wd)  # the largest tap offset
    g_rows = jnp.pad(g_rows, ((reach, 0), (0, 0)))
    shifted = jnp.zeros((rows, 9, cout), g.dtype)
    for tap in range(9):
        offset = _tap_offset(tap, wd)
        part = lax.slice_in_dim(g_rows, reach - offset, reach - offset + rows)
        shifted = lax.dynamic_update_slice(shifted, part[:, None, :], (0, tap, 0))
    accumulate = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    dw = lax.dot_general(
        x_rows,
        shifted.reshape(rows, 9 * cout),
        (((0,), (0,)), ((), ())),
        preferred_element_type=accumulate,
    )
    return dw.reshape(cin, 3, 3, cout).transpose(1, 2, 0, 3).astype(x.dtype)


def _row_windows(x: jax.Array, g: jax.Array) -> jax.Array:
    """For each kernel row dy, x's rows from dy*(W+2) on against [g shifted by 0, 1 and 2
    rows, side by side]: three products, one buffer of shifted g."""
    cin, cout = x.shape[-1], g.shape[-1]
    stride = x.shape[2] + 2  # rows of the padded grid from one image row to the next
    x_rows, g_rows = _grid_rows(x, g)
    rows = x_rows.shape[0]
    # Tap (dy, dx) pairs x row q + dy*stride with g row q - dx: shifted[q, dx] = g_rows[q - dx].
    g_rows = jnp.pad(g_rows, ((2, 0), (0, 0)))
    shifted = jnp.concatenate(
        [lax.slice_in_dim(g_rows, 2 - dx, 2 - dx + rows) for dx in range(3)], axis=1
    )
    x_rows = jnp.pad(x_rows, ((0, 2 * stride), (0, 0)))
    accumulate = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    per_row = [
        lax.dot_general(
            lax.slice_in_dim(x_rows, dy * stride, dy * stride + rows),
            shifted,
            (((0,), (0,)), ((), ())),
            preferred_element_type=accumulate,
        )
        for dy in range(3)
    ]  # each [cin, 3 * cout], dx-major
    dw = jnp.stack(per_row, axis=1).reshape(cin, 3, 3, cout)
    return dw.transpose(1, 2, 0, 3).astype(x.dtype)


def space_to_depth_kernel_gradient(x: jax.Array, g: jax.Array, kernel: int, pad: int) -> jax.Array:
    """d(sum(g * conv(x, w)))/dw for a k x k, stride-2 NHWC/HWIO convolution with padding
    `pad` on every side (the stem's 7x7 of ResNet50 and DenseNet121), as products over the
    rows of x in space-to-depth form.

    The padded input, cut into 2x2 blocks with each block's pixels as channels
    ([N, Hs, Ws, 4*Cin]), makes the convolution a stride-1 one with ceil(k/2) taps a side
    (kernel tap (2*qy + py, 2*qx + px) is block tap (qy, qx), channel (py, px, c)). With g
    on that block grid (zeros past its edges) and both flattened to rows, block tap (qy,
    qx) pairs row r of g with row r + qy*Ws + qx of the blocks, so the taps of block row
    qy are one product of [the blocks shifted by 0 .. ceil(k/2)-1 rows, side by side] from
    row qy*Ws on with g (`_row_windows`'s form). Taps past the kernel's edge (the last block
    tap's second pixel when k is odd) are dropped."""
    n, h, wd, cin = x.shape
    _, ho, wo, cout = g.shape
    taps = (kernel + 1) // 2
    hs, ws = ho + taps - 1, wo + taps - 1  # the block grid: every tap of every output
    # lax.pad: a negative high padding crops pixels that no output reaches.
    edges = ((0, 0, 0), (pad, 2 * hs - h - pad, 0), (pad, 2 * ws - wd - pad, 0), (0, 0, 0))
    padded = lax.pad(x, jnp.zeros((), x.dtype), edges)
    blocks = padded.reshape(n, hs, 2, ws, 2, cin).transpose(0, 1, 3, 2, 4, 5)
    rows = n * hs * ws
    x_rows = blocks.reshape(rows, 4 * cin)
    g_rows = jnp.pad(g, ((0, 0), (0, hs - ho), (0, ws - wo), (0, 0))).reshape(rows, cout)
    x_rows = jnp.pad(x_rows, ((0, taps * ws), (0, 0)))
    span = rows + (taps - 1) * ws
    shifted = jnp.concatenate(
        [lax.slice_in_dim(x_rows, qx, qx + span) for qx in range(taps)], axis=1
    )
    accumulate = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    per_row = [
        lax.dot_general(
            lax.slice_in_dim(shifted, qy * ws, qy * ws + rows),
            g_rows,
            (((0,), (0,)), ((), ())),
            preferred_element_type=accumulate,
        )
        for qy in range(taps)
    ]  # each [taps (qx) * 4 * cin, cout]
    dw = jnp.stack(per_row).reshape(taps, taps, 2, 2, cin, cout)  # qy, qx, py, px
    dw = dw.transpose(0, 2, 1, 3, 4, 5).reshape(2 * taps, 2 * taps, cin, cout)
    return dw[:kernel, :kernel].astype(x.dtype)


def taps_forward(x: jax.Array, w: jax.Array) -> jax.Array:
    """A 3x3, stride-1, padding-1 NHWC/HWIO convolution as one matrix product of the padded
    input with all nine taps' kernels side by side ([N*(H+2)*(W+2), Cin] x [Cin, 9*Cout]),
    then the sum of the nine products, each shifted to its tap's offset."""
    n, h, wd, cin = x.shape
    cout = w.shape[-1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernels = jnp.transpose(w, (2, 0, 1, 3)).reshape(cin, 9 * cout)
    taps = lax.dot_general(padded, kernels, (((3,), (0,)), ((), ())))
    taps = taps.reshape(n, h + 2, wd + 2, 9, cout)
    out = None
    for dy in range(3):
        for dx in range(3):
            part = taps[:, dy : dy + h, dx : dx + wd, 3 * dy + dx]
            out = part if out is None else out + part
    return out


def _plain_3x3(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


@jax.custom_vjp
def _conv_taps(x, w):
    return taps_forward(x, w)


def _conv_taps_fwd(x, w):
    return taps_forward(x, w), (x, w)


def _conv_3x3_bwd(residuals, g):
    """XLA's own input gradient; the kernel gradient by `shifted_kernel_gradient` where
    `uses_shifted_kernel_grad` says so, else XLA's own too."""
    x, w = residuals
    pads = ((1, 1), (1, 1))
    if not uses_shifted_kernel_grad(x.shape, w.shape, (1, 1), pads, NHWC):
        return jax.vjp(_plain_3x3, x, w)[1](g)
    (dx,) = jax.vjp(lambda x_: _plain_3x3(x_, w), x)[1](g)
    return dx, shifted_kernel_gradient(x, g).astype(w.dtype)


_conv_taps.defvjp(_conv_taps_fwd, _conv_3x3_bwd)


@jax.custom_vjp
def _conv_3x3(x, w):
    return _plain_3x3(x, w)


def _conv_3x3_fwd(x, w):
    return _plain_3x3(x, w), (x, w)


_conv_3x3.defvjp(_conv_3x3_fwd, _conv_3x3_bwd)


def _forward(x, w, strides, pads, precision, preferred):
    if MATMUL_1X1_FORWARD and w.shape[:2] == (1, 1) and not any(a or b for a, b in pads):
        sy, sx = strides
        if (sy, sx) != (1, 1):
            x = x[:, ::sy, ::sx, :]
        return lax.dot_general(
            x,
            w[0, 0],
            (((3,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=preferred,
        )
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        pads,
        dimension_numbers=NHWC,
        precision=precision,
        preferred_element_type=preferred,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, preferred):
    return _forward(x, w, strides, pads, precision, preferred)


def _conv_fwd(x, w, strides, pads, precision, preferred):
    return _forward(x, w, strides, pads, precision, preferred), (x, w)


def _conv_bwd(strides, pads, precision, preferred, residuals, g):
    x, w = residuals
    (dx,) = jax.linear_transpose(
        lambda x_: _forward(x_, w, strides, pads, precision, preferred), x
    )(g)
    if uses_space_to_depth_kernel_grad(x.shape, w.shape, strides, pads, NHWC):
        return dx, space_to_depth_kernel_gradient(x, g, w.shape[0], pads[0][0]).astype(w.dtype)
    return dx, kernel_gradient(x, g, w.shape, strides, pads).astype(w.dtype)


def kernel_gradient(
    x: jax.Array,
    g: jax.Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> jax.Array:
    """d(sum(g * conv(x, w)))/dw for an NHWC/HWIO convolution: for each kernel tap (dy, dx),
    the strided window of the padded `x` it meets, as [N*Ho*Wo, Cin], times g as
    [N*Ho*Wo, Cout] (accumulated in float32, or float64 for float64 input)."""
    kh, kw, cin, cout = kernel_shape
    n, ho, wo, _ = g.shape
    sy, sx = strides
    if any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    rows = g.reshape(n * ho * wo, cout)
    accumulate = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
    windows = [
        lax.slice(
            x,
            (0, dy, dx, 0),
            (n, dy + (ho - 1) * sy + 1, dx + (wo - 1) * sx + 1, cin),
            (1, sy, sx, 1),
        ).reshape(n * ho * wo, cin)
        for dy in range(kh)
        for dx in range(kw)
    ]
    if TRANSPOSED_ROW_PRODUCTS and len(windows) > 1:  # g transposed once for every tap
        g_cols = barrier.materialise(rows.T)
        # Each tap's [cout, cin] is transposed only after the stack: XLA folds a product's own
        # transpose into the product, which would contract x's rows again.
        taps = [_plain_product(g_cols, w, accumulate) for w in windows]
        return jnp.stack(taps).reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)
    taps = [
        lax.dot_general(w, rows, (((0,), (0,)), ((), ())), preferred_element_type=accumulate)
        for w in windows
    ]
    return jnp.stack(taps).reshape(kh, kw, cin, cout)


def _plain_product(a: jax.Array, b: jax.Array, accumulate) -> jax.Array:
    """a [m, k] times b [k, n], accumulated in `accumulate`."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=accumulate)


_conv.defvjp(_conv_fwd, _conv_bwd)

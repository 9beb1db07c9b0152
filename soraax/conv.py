"""A 3D convolution computed as a 2D convolution over its time taps stacked in the channels, where faster.

XLA's CPU backend has a fast path for 2D convolutions and none for 3D ones: measured on 2 cores, a 3x3x3 conv
of 16 -> 16 channels over 19 x 64 x 96 takes 96 ms as one 3D conv and 42 ms as one 2D conv over 3 x 16
channels (output frames folded into the batch), its gradient 392 vs 116 ms, a strided one's gradient 512 vs
16 ms; the tiny VAE's whole encode of a 17 x 40 x 40 clip 40 -> 6 ms. (One conv per tap, summed, runs about
as fast but compiles twice as long, which the input pipeline pays once per clip shape.) At 128 channels the
gradient gets slower (3.3 -> 6.1 s), so the fold is used on CPU for convs of at most `MAX_SPLIT_CHANNELS`
channels either side, which is every conv of the tiny VAEs that the pipeline runs for each clip; TPUs and
GPUs keep the native 3D conv. Both compute the same sum of products (in another order: float32 results
differ by rounding, ~1e-6 relative).

The function has `lax.conv_general_dilated`'s signature, so it is passed to `flax.linen.Conv` as its
`conv_general_dilated` and the params (kernel [kt, kh, kw, Cin, Cout], bias) are exactly the 3D conv's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MAX_SPLIT_CHANNELS = 64

# flax.linen.Conv's layout for 3 spatial dims: inputs [N, T, H, W, C], kernel [T, H, W, I, O].
_LAYOUT_3D = ("NDHWC", "DHWIO", "NDHWC")
_LAYOUT_2D = ("NHWC", "HWIO", "NHWC")


def _is_channels_last_3d(dimension_numbers, ndim: int) -> bool:
    if ndim != 5:
        return False
    expected = lax.conv_dimension_numbers((1,) * 5, (1,) * 5, _LAYOUT_3D)
    given = lax.conv_dimension_numbers((1,) * 5, (1,) * 5, dimension_numbers) if dimension_numbers else None
    return given == expected


def _trivial(dilation) -> bool:
    return dilation is None or all(d == 1 for d in dilation)


def splits_time(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
    """Whether this conv runs as a 2D conv over its stacked time taps: a plain channels-last 3D conv with no time padding
    (CausalConv3d pads time itself), small enough channels, on the CPU backend."""
    return (jax.default_backend() == "cpu" and _is_channels_last_3d(dimension_numbers, lhs.ndim)
            and feature_group_count == 1 and _trivial(lhs_dilation) and _trivial(rhs_dilation)
            and not isinstance(padding, str) and tuple(padding[0]) == (0, 0)
            and max(rhs.shape[-2], rhs.shape[-1]) <= MAX_SPLIT_CHANNELS)


def time_split_conv(lhs_NxTxHxWxC, rhs_KtxKhxKwxIxO, window_strides, padding, lhs_dilation=None,
                    rhs_dilation=None, dimension_numbers=None, feature_group_count=1, precision=None,
                    preferred_element_type=None, **kwargs):
    """`lax.conv_general_dilated`, with the time taps folded into a 2D conv's channels where `splits_time`
    says so, and the plain call otherwise."""
    if kwargs or not splits_time(lhs_NxTxHxWxC, rhs_KtxKhxKwxIxO, padding, lhs_dilation, rhs_dilation,
                                 dimension_numbers, feature_group_count):
        return lax.conv_general_dilated(
            lhs_NxTxHxWxC, rhs_KtxKhxKwxIxO, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs)
    n, t, h, w, c = lhs_NxTxHxWxC.shape
    kt, kh, kw, _, features = rhs_KtxKhxKwxIxO.shape
    stride_t = window_strides[0]
    out_t = (t - kt) // stride_t + 1
    if out_t < 1:
        raise ValueError(f"a conv of {kt} time taps needs at least {kt} frames, got {t}")
    # The frames each tap sees for every output frame, side by side in the channels: one 2D conv over
    # kt * Cin channels (one op to compile, not one a tap), output frames folded into the batch.
    taps_NxTxHxWxKC = jnp.concatenate(
        [lax.slice_in_dim(lhs_NxTxHxWxC, tap, tap + (out_t - 1) * stride_t + 1, stride_t, axis=1)
         for tap in range(kt)], axis=-1)
    kernel_KhxKwxKCxO = jnp.moveaxis(rhs_KtxKhxKwxIxO, 0, 2).reshape(kh, kw, kt * c, features)
    y = lax.conv_general_dilated(
        taps_NxTxHxWxKC.reshape(n * out_t, h, w, kt * c), kernel_KhxKwxKCxO, window_strides[1:], padding[1:],
        dimension_numbers=_LAYOUT_2D, precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(n, out_t, *y.shape[1:])

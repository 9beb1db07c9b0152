"""The dense layers' matmul: operands in `matmul_dtype`, products summed in float32, the result in the
layer's own dtype; for `nn.Dense(dot_general=dense_dot_general(...))`.

Why not Flax's default (`lax.dot_general` on the promoted operands): in bfloat16 that asks for a bfloat16
*result*, and XLA's CPU backend has no fast kernel for it. On an AVX-512 BF16 CPU (AMD EPYC, 2 cores) a
[2048, 384] x [384, 1536] product ran at 154 GFLOP/s with a bfloat16 result, 200 in float32, and 390 with
bfloat16 operands and a float32 result, the form its GEMM library (YNNPACK) implements with the CPU's
bf16 dot-product instructions. TPU and GPU matmuls already sum bfloat16 products in float32 and round
once at the end, so there the request only says explicitly what they do; on CPU it picks the fast kernel.

Autodiff would not keep the form in the backward pass: the float32 result's cotangent is float32, so both
gradient products would mix a float32 and a bfloat16 operand, a form with no bf16 kernel. The custom VJP
below rounds the cotangent to `matmul_dtype` first, which is what a bfloat16 layer's backward does anyway,
so all three products of a layer run on the fast kernel. (Measured: XLA's FLOPs for the step stay within
0.8% under every remat policy, and DiT-XL's per-chip memory on v5p-64 stays the same; benchmarks/README.md.)
A custom VJP has no forward-mode rule: `jax.jvp` through a layer that rounds is refused (nothing here uses it).

`matmul_dtype=bfloat16` in a float32 model (`model.matmul_dtype`) is what TPUs do with float32 matmuls at
JAX's default precision (one bfloat16 pass): params, activations, norms, softmax and the loss stay float32;
only the GEMMs' inputs are rounded.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

MATMUL_DTYPES = ("float32", "bfloat16")


def _product(a, b, spec: str):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=None)
def rounded_dense(matmul_dtype: str) -> Callable:
    """x [..., K] @ w [K, F] (one dtype, Flax's promoted one) with both operands, and in the backward the
    cotangent, rounded to `matmul_dtype` and summed in float32; the result and both gradients in x's dtype.
    One custom-VJP function object a dtype (cached)."""

    @jax.custom_vjp
    def rounded(x_NxK, w_KxF):
        return forward(x_NxK, w_KxF)[0]

    def forward(x_NxK, w_KxF):
        y_NxF = _product(x_NxK.astype(matmul_dtype), w_KxF.astype(matmul_dtype), "...k,kf->...f")
        # The operands as they came, cast again in the backward: saving the casts would keep a bfloat16
        # copy beside the float32 activation the model keeps anyway (+10-15% of a DiT step's memory).
        return y_NxF.astype(x_NxK.dtype), (x_NxK, w_KxF)

    def backward(residuals, dy_NxF):  # dy has the result's dtype, which is x's and w's
        x_NxK, w_KxF = residuals
        xm_NxK, wm_KxF = x_NxK.astype(matmul_dtype), w_KxF.astype(matmul_dtype)
        dym_NxF = dy_NxF.astype(matmul_dtype)
        dx_NxK = _product(dym_NxF, wm_KxF, "...f,kf->...k").astype(dy_NxF.dtype)
        dw_KxF = _product(xm_NxK, dym_NxF, "...k,...f->kf").astype(dy_NxF.dtype)
        return dx_NxK, dw_KxF

    rounded.defvjp(forward, backward)
    return rounded


@functools.lru_cache(maxsize=None)
def dense_dot_general(matmul_dtype: str | None = None) -> Callable:
    """A `dot_general` for `nn.Dense`: operands (already promoted to the layer's dtype by Flax) cast to
    `matmul_dtype` (None: the layer's dtype), float32 sums, the result in the layer's dtype.

    A float32 (or float64) layer with matmuls in its own dtype calls `lax.dot_general` itself: the same
    program as a plain Dense.
    Cached, so every layer of one dtype holds the same function (Flax compares module fields).
    """
    if matmul_dtype is not None and matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype {matmul_dtype!r} is not one of {MATMUL_DTYPES}")

    def dot_general(x_NxK, w_KxF, dimension_numbers, precision=None, preferred_element_type=None):
        if dimension_numbers != (((x_NxK.ndim - 1,), (0,)), ((), ())) or preferred_element_type is not None:
            raise ValueError(f"dense_dot_general serves nn.Dense ([..., K] x [K, F]); got {dimension_numbers}")
        if x_NxK.dtype != w_KxF.dtype:
            raise ValueError(f"dense_dot_general takes operands of one dtype (nn.Dense promotes them); "
                             f"got {x_NxK.dtype} and {w_KxF.dtype}")
        dtype = jnp.dtype(matmul_dtype if matmul_dtype is not None else x_NxK.dtype)
        if dtype == x_NxK.dtype and jnp.finfo(dtype).bits >= 32:  # nothing to round, sums in its own dtype
            return lax.dot_general(x_NxK, w_KxF, dimension_numbers, precision=precision)
        if precision is not None:
            raise ValueError(f"precision={precision!r} asks for more passes of a float32 matmul, but this layer "
                             f"rounds its operands to {dtype.name}; set matmul_dtype='float32' instead")
        return rounded_dense(dtype.name)(x_NxK, w_KxF)

    return dot_general

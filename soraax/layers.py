"""The two sublayers every transformer here is made of, shared by the DiT and the text encoder.

Kernels carry logical axis names (`embed`, `heads`, `mlp`); activations are constrained to the caller's
`activation_axes` (video tokens are `length`, caption tokens `text_length`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from soraax.attention import attention
from soraax.matmul import dense_dot_general


def _dense(features: int, kernel_axes: tuple[str, str], bias_axis: str, dtype, name: str,
           matmul_dtype: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name, dot_general=dense_dot_general(matmul_dtype),
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), kernel_axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (bias_axis,)))


class MultiHeadAttention(nn.Module):
    """Projections around `attention`: self-attention when `kv_BxLxD` is the query stream, else cross.

    Projections are plain Dense layers reshaped to heads (kernels named `(embed, heads)`, so tensor
    parallelism splits whole heads): Flax's DenseGeneral re-traces its initialiser on a flattened kernel in
    `apply`, which logical partitioning rejects under a mesh. `rotate` (e.g. RoPE) acts on q and k.

    `qk_norm` RMS-normalises q and k over their whole width, all heads together, before the split into heads
    and before `rotate` (Wan 2.1's "rms_norm_across_heads"): it bounds the logits, which keeps large video
    models' attention from saturating in bf16.
    """
    heads: int
    attn_impl: str = "xla"
    dtype: Any = jnp.float32
    activation_axes: tuple[str, str, str] = ("batch", "length", "embed")
    qk_norm: bool = False
    norm_eps: float = 1e-6
    local_max_len: int = 0   # self-attention over rows of clips of at most this many tokens (attention.attention)
    matmul_dtype: str | None = None  # operands of the projections and attention products (soraax/matmul.py)

    @nn.compact
    def __call__(self, x_BxSxD, kv_BxLxD, q_segment_ids, kv_segment_ids,
                 rotate: Callable[[jax.Array], jax.Array] | None = None, local_fits=None):
        width = x_BxSxD.shape[-1]
        if width % self.heads:
            raise ValueError(f"attention width {width} is not divisible by heads={self.heads}")
        head_dim = width // self.heads
        batch, length, _ = self.activation_axes

        def project(name, x):
            y = _dense(width, ("embed", "heads"), "heads", self.dtype, name, self.matmul_dtype)(x)
            if self.qk_norm and name != "value":
                y = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name=f"norm_{name}",
                               scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads",)))(y)
            return y.reshape(*y.shape[:-1], self.heads, head_dim)

        q_BxSxHxK = project("query", x_BxSxD)
        k_BxLxHxK = project("key", kv_BxLxD)
        v_BxLxHxK = project("value", kv_BxLxD)
        if rotate is not None:
            q_BxSxHxK, k_BxLxHxK = rotate(q_BxSxHxK), rotate(k_BxLxHxK)
        q_BxSxHxK = nn.with_logical_constraint(q_BxSxHxK, (batch, length, "heads", "kv"))
        if self.matmul_dtype is not None:
            # Attention sums its products and softmax in float32 whatever its inputs (soraax/attention.py).
            q_BxSxHxK, k_BxLxHxK, v_BxLxHxK = (a.astype(self.matmul_dtype) for a in (q_BxSxHxK, k_BxLxHxK, v_BxLxHxK))
        out_BxSxHxK = attention(q_BxSxHxK, k_BxLxHxK, v_BxLxHxK, q_segment_ids, kv_segment_ids,
                                impl=self.attn_impl, local_max_len=self.local_max_len, local_fits=local_fits)
        out_BxSxD = _dense(width, ("heads", "embed"), "embed", self.dtype, "out", self.matmul_dtype)(
            out_BxSxHxK.reshape(*out_BxSxHxK.shape[:-2], width))
        return nn.with_logical_constraint(out_BxSxD, self.activation_axes)


class Mlp(nn.Module):
    """Position-wise MLP: Dense to `hidden`, GELU, Dense back to the input width.

    GELU is tanh-approximated (DiT's choice) unless `exact_gelu` (BERT's erf form, which pretrained weights
    need: the two differ by up to ~1e-3 an activation, more than a parity check allows).
    """
    hidden: int
    dtype: Any = jnp.float32
    activation_axes: tuple[str, str, str] = ("batch", "length", "embed")
    exact_gelu: bool = False
    matmul_dtype: str | None = None  # the two Dense layers' operand dtype (soraax/matmul.py); None: dtype

    @nn.compact
    def __call__(self, x_BxSxD):
        batch, length, _ = self.activation_axes
        h_BxSxF = _dense(self.hidden, ("embed", "mlp"), "mlp", self.dtype, "fc1", self.matmul_dtype)(x_BxSxD)
        h_BxSxF = nn.with_logical_constraint(nn.gelu(h_BxSxF, approximate=not self.exact_gelu), (batch, length, "mlp"))
        return _dense(x_BxSxD.shape[-1], ("mlp", "embed"), "embed", self.dtype, "fc2", self.matmul_dtype)(h_BxSxF)

"""The masked softmax every dense attention path shares (attention.py's xla and flash blocks, local_attention.py).

One definition of the three details that keep segment-masked attention exact and its gradients finite:
forbidden logits are -inf; the row max that conditions the exponent carries no gradient and is 0 for a row
with no allowed key (so exp(-inf - 0) = 0, never NaN); and such a row's denominator is 1, so its weights
and its output are exactly zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def segment_mask(q_segment_ids_BxQ, kv_segment_ids_BxK):
    """bool [B, Q, K]: query and key share a nonzero segment id."""
    q_ids_BxQx1 = q_segment_ids_BxQ[..., :, None]
    return (q_ids_BxQx1 == kv_segment_ids_BxK[..., None, :]) & (q_ids_BxQx1 != 0)


def safe_max(logits_max):
    """The max to subtract: 0 where a row has no allowed key (max -inf)."""
    return jnp.where(jnp.isfinite(logits_max), logits_max, 0.0)


def masked_probs(logits, mask):
    """Softmax over the last axis of float32 `logits` where `mask` (broadcast to them) allows, else 0.

    The max only conditions the exponent (softmax is invariant to it), so it is a stopped gradient: the
    gradient of a max over an all -inf row would be NaN.
    """
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = safe_max(lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    p = jnp.exp(logits - row_max)
    denom = p.sum(axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def pad_length(x, length: int):
    """Zero-pads axis 1 (the sequence) to `length`; zero segment ids make the padding invisible."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)

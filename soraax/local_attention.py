"""Packed self-attention that computes only the key blocks a clip can reach.

In a packed row every clip is a contiguous run of at most `max_len` tokens (data.token_budget), so a query
can only ever see keys within `max_len - 1` positions of itself. The row is cut into query blocks of
`block` tokens, and each block attends to the window of its own block and `reach` blocks either side
(`reach * block >= max_len - 1`): [B, H, S, (2 reach + 1) block] logits instead of [B, H, S, S], which is
what the dense backends spend on pairs of tokens from different clips (measured: ~43% of the tiny model's
step at rows of 768). Inside the window the segment mask does the rest, so the result is the dense
attention's exactly (same products, the excluded ones being masked to zero weight in both).

That holds only for rows whose clips are contiguous runs of at most `max_len` tokens; `fits` checks it at
run time in O(S log S), and the caller (`attention.attention`) falls back to the whole-row backend under
`lax.cond` for any batch that does not fit (e.g. a sampled clip larger than the training budget), so the
function is always the dense one; only the cost changes.

Dimension key: B batch, S length, H heads, D head dim, N blocks, Q block length, W window (2 reach + 1) Q.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from soraax.masked_softmax import masked_probs, pad_length, segment_mask


def plan(seq_len: int, max_len: int) -> tuple[int, int] | None:
    """(block, reach) for rows of `seq_len` holding clips of at most `max_len` tokens, or None where the
    window would not be much smaller than the row (then the dense backend is as cheap and simpler)."""
    if max_len < 1 or seq_len < 1:
        return None
    block = max(1, -(-max_len // 2))           # reach 2: window ~2.5 max_len, the least for few blocks
    reach = -(-(max_len - 1) // block)
    window = (2 * reach + 1) * block
    if 2 * window > seq_len:
        return None
    return block, reach


def applies(impl: str, q_len: int, kv_len: int, max_len: int) -> tuple[int, int] | None:
    """The (block, reach) local self-attention would use for this call, or None where it does not apply:
    the one gate attention.attention and the DiT (which runs `fits` once for all layers) both ask."""
    if not max_len or impl not in ("xla", "chunked") or q_len != kv_len:
        return None
    return plan(q_len, max_len)


def fits(segment_ids_BxS, max_len: int):
    """bool scalar: in every row each nonzero segment is ONE contiguous run of at most `max_len` tokens."""
    b, s = segment_ids_BxS.shape
    ids_BxS = segment_ids_BxS.astype(jnp.int32)
    starts_BxS = jnp.concatenate([jnp.ones((b, 1), bool), ids_BxS[:, 1:] != ids_BxS[:, :-1]], axis=1)
    run_BxS = jnp.cumsum(starts_BxS, axis=1) - 1
    # Run lengths: each position counts into its run (at most S runs a row).
    lengths_BxS = jnp.zeros((b, s), jnp.int32).at[jnp.arange(b)[:, None], run_BxS].add(1)
    run_of_real_BxS = jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], run_BxS].max(ids_BxS != 0)
    short_runs = jnp.all(jnp.where(run_of_real_BxS, lengths_BxS, 0) <= max_len)
    # One run an id: as many distinct nonzero ids as runs of nonzero ids.
    sorted_BxS = jnp.sort(ids_BxS, axis=1)
    new_id_BxS = jnp.concatenate([sorted_BxS[:, :1] != 0, (sorted_BxS[:, 1:] != sorted_BxS[:, :-1])
                                  & (sorted_BxS[:, 1:] != 0)], axis=1)
    one_run_each = jnp.all(new_id_BxS.sum(axis=1) == (starts_BxS & (ids_BxS != 0)).sum(axis=1))
    return short_runs & one_run_each


def _blocks(x_BxSxR, n: int, block: int):
    """[B, S, ...] (S = n * block) -> [B, N, Q, ...]."""
    return x_BxSxR.reshape(x_BxSxR.shape[0], n, block, *x_BxSxR.shape[2:])


def _windows(x_BxSxR, n: int, block: int, reach: int):
    """[B, S, ...] -> [B, N, W, ...]: for each block, itself and `reach` blocks either side (zeros past the
    row's ends, whose zero segment ids make them invisible)."""
    pad = [(0, 0)] * x_BxSxR.ndim
    pad[1] = (reach * block, reach * block)
    padded = jnp.pad(x_BxSxR, pad)
    return jnp.concatenate([_blocks(padded[:, j * block:(j + n) * block], n, block)
                            for j in range(2 * reach + 1)], axis=2)


def local_attention(q_BxSxHxD, k_BxSxHxD, v_BxSxHxD, segment_ids_BxS, *, block: int, reach: int):
    """Segment-masked self-attention over each block's window; -> [B, S, H, D] in q's dtype."""
    b, s, h, d = q_BxSxHxD.shape
    n = -(-s // block)
    length = n * block
    pad = functools.partial(pad_length, length=length)
    q_BxNxQxHxD = _blocks(pad(q_BxSxHxD), n, block)
    ids = pad(segment_ids_BxS)
    q_ids_BxNxQ = _blocks(ids, n, block)
    k_BxNxWxHxD, v_BxNxWxHxD = (_windows(pad(x), n, block, reach) for x in (k_BxSxHxD, v_BxSxHxD))
    kv_ids_BxNxW = _windows(ids, n, block, reach)

    scale = 1.0 / math.sqrt(d)
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q_BxNxQxHxD, k_BxNxWxHxD,
                        preferred_element_type=jnp.float32) * scale
    probs = masked_probs(logits, segment_mask(q_ids_BxNxQ, kv_ids_BxNxW)[:, :, None])
    out_BxNxQxHxD = jnp.einsum("bnhqk,bnkhd->bnqhd", probs.astype(v_BxNxWxHxD.dtype), v_BxNxWxHxD,
                               preferred_element_type=jnp.float32)
    return out_BxNxQxHxD.reshape(b, length, h, d)[:, :s].astype(q_BxSxHxD.dtype)

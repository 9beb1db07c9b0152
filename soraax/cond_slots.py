"""adaLN conditioning computed once per distinct (clip, timestep) of a packed row, not once per token.

The DiT's conditioning is per token because a packed row holds clips at different timesteps and a clip's
held frames (image->video, extension) sit at t = 0. But it takes few distinct values: every token of a clip
shares its clip's t (or 0, held), its caption and its noise-augmentation level. Projecting each token's copy
through the timestep MLP and every block's adaLN Dense (6 D^2 multiply-adds a token a layer: ~30% of a DiT's
matmuls) repeats the same product hundreds of times. Here a row's tokens are grouped into SLOTS, one per
distinct (segment id, t, aug), the conditioning is computed for each slot, and each token gathers its slot's
vectors: exactly the per-token result (the same rows of the same products), for a fraction of the FLOPs.

The train step and every sampler give a clip one t plus t = 0 for held tokens, so `2 * max_segments + 1`
slots (the +1: padding, all of whose tokens share one slot whatever their t) always suffice. A row with more
distinct keys than slots cannot be represented: the DiT returns NaN for its tokens (never a silently wrong
velocity), and a train step skips such an update as non-finite.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def slots_for(max_segments: int) -> int:
    """Slots that always suffice for rows of `max_segments` clips: a t and a held t = 0 each, plus padding."""
    return 2 * int(max_segments) + 1


def conditioning_slots(segment_ids_BxS, t_BxS, num_slots: int, aug_BxS=None):
    """Groups each row's tokens by (segment id, t, aug).

    Returns (slot_BxS int32 in [0, num_slots), first_BxM int32 (the index of one token of each slot; 0 for
    unused slots), fits_B bool (the row has at most `num_slots` distinct keys)). Padding (segment 0) is one
    key whatever its t and aug. Runs in O(S log S) (one sort a row); no gradient flows through it.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    b, s = segment_ids_BxS.shape
    real_BxS = segment_ids_BxS > 0
    keys = [segment_ids_BxS.astype(jnp.int32), jnp.where(real_BxS, t_BxS.astype(jnp.float32), 0.0)]
    if aug_BxS is not None:
        keys.append(jnp.where(real_BxS, aug_BxS.astype(jnp.float32), 0.0))
    keys = [lax.stop_gradient(k) for k in keys]
    index_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    *sorted_keys, order_BxS = lax.sort((*keys, index_BxS), dimension=1, num_keys=len(keys))
    # A sorted position starts a new slot where any key differs from the position before it.
    changed_BxS1 = jnp.zeros((b, s - 1), bool)
    for key in sorted_keys:
        changed_BxS1 = changed_BxS1 | (key[:, 1:] != key[:, :-1])
    starts_BxS = jnp.concatenate([jnp.ones((b, 1), bool), changed_BxS1], axis=1)
    rank_BxS = jnp.cumsum(starts_BxS, axis=1, dtype=jnp.int32) - 1     # slot of each sorted position
    fits_B = rank_BxS[:, -1] < num_slots
    rows_Bx1 = jnp.arange(b)[:, None]
    slot_BxS = jnp.zeros((b, s), jnp.int32).at[rows_Bx1, order_BxS].set(jnp.minimum(rank_BxS, num_slots - 1))
    first_BxM = jnp.zeros((b, num_slots), jnp.int32).at[
        rows_Bx1, jnp.where(starts_BxS, rank_BxS, num_slots)].set(order_BxS, mode="drop")
    return slot_BxS, first_BxM, fits_B


def gather_slots(values_BxM, index_BxS):
    """values [B, M, ...] -> [B, S, ...]: each token's row of its slot (or any [B, S] index into axis 1)."""
    index = index_BxS.reshape(*index_BxS.shape, *(1,) * (values_BxM.ndim - 2))
    return jnp.take_along_axis(values_BxM, index, axis=1)


def at_slots(values_BxS, first_BxM):
    """Per-token values [B, S, ...] -> one per slot [B, M, ...], read at each slot's first token."""
    return gather_slots(values_BxS, first_BxM)


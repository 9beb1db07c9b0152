"""Classifier-free guidance's caption dropout, done inside the jitted step on packed rows, for any tokenizer.

A dropped caption becomes the empty caption in place: its first slots take the empty caption's ids (or, for
text states cached by the pipeline, the frozen encoder's states of the empty caption) and its other slots
become padding, so the DiT sees exactly what sampling's unconditional pass gives it. Every caption holds at
least the empty caption's special tokens, so the empty one always fits where the caption was.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from soraax.packing import positions_from_segment_ids


def _dropped(key, text_segment_ids_BxL, max_segments: int, rate: float):
    """(bool [B, L]: the token's caption is dropped, int32 [B, L]: the token's place in its caption)."""
    drop_BxM = jax.random.bernoulli(key, rate, (text_segment_ids_BxL.shape[0], max_segments + 1))
    drop_BxL = jnp.take_along_axis(drop_BxM, text_segment_ids_BxL, axis=1) & (text_segment_ids_BxL > 0)
    return drop_BxL, positions_from_segment_ids(text_segment_ids_BxL)


def drop_captions(key, text_tokens_BxL, text_segment_ids_BxL, *, max_segments: int, rate: float,
                  empty_ids: Sequence[int]):
    """(text_tokens, text_segment_ids) with each caption, with probability `rate`, the empty caption."""
    drop_BxL, position_BxL = _dropped(key, text_segment_ids_BxL, max_segments, rate)
    n = len(empty_ids)
    empty_E = jnp.asarray(tuple(empty_ids), text_tokens_BxL.dtype)
    empty_BxL = jnp.where(position_BxL < n, empty_E[jnp.minimum(position_BxL, n - 1)], 0)
    tokens_BxL = jnp.where(drop_BxL, empty_BxL, text_tokens_BxL).astype(text_tokens_BxL.dtype)
    segment_ids_BxL = jnp.where(drop_BxL & (position_BxL >= n), 0, text_segment_ids_BxL)
    return tokens_BxL, segment_ids_BxL


def drop_caption_states(key, text_states_BxLxT, text_segment_ids_BxL, *, max_segments: int, rate: float,
                        empty_states_ExT):
    """The same dropout on cached states: (text_states, text_segment_ids); `empty_states_ExT` are the frozen
    encoder's states of the empty caption. Same key, same captions dropped as `drop_captions`."""
    drop_BxL, position_BxL = _dropped(key, text_segment_ids_BxL, max_segments, rate)
    n = empty_states_ExT.shape[0]
    empty_BxLxT = jnp.asarray(empty_states_ExT, text_states_BxLxT.dtype)[jnp.minimum(position_BxL, n - 1)]
    keep_empty_BxL = drop_BxL & (position_BxL < n)
    states_BxLxT = jnp.where(keep_empty_BxL[..., None], empty_BxLxT,
                             jnp.where(drop_BxL[..., None], 0.0, text_states_BxLxT))
    segment_ids_BxL = jnp.where(drop_BxL & (position_BxL >= n), 0, text_segment_ids_BxL)
    return states_BxLxT.astype(text_states_BxLxT.dtype), segment_ids_BxL

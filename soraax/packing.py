"""Patch n' Pack (NaViT) for spacetime patches, around Grain's packers.

Grain's `FirstFitPackIterDataset` / `BestFitPackIterDataset` already pack dicts of multi-dimensional
features into fixed-length rows with aligned `<feature>_segment_ids` (0 = padding). This module adds what a
video trainer needs on top of them:
  * `pack_clips`: the packer configured for one clip per example, a cap of `max_segments` clips a row,
    text packed alongside so that text segment k belongs to video segment k, and rows renamed to the one
    batch format of DESIGN.md (`tokens, coords, segment_ids, cond_mask, text_tokens, text_segment_ids`);
  * `unpack_row`: a packed row back into its clips (a clip's shape is its coords' max + 1);
  * `packing_stats`: real tokens / slots;
  * in-model helpers that derive per-segment quantities from `segment_ids` alone
    (`segment_token_counts`, `positions_from_segment_ids`).

An example entering `pack_clips` is `{tokens [N,P] float32, coords [N,3] int32, cond_mask [N] bool,
text_tokens [L] int32}`, and optionally `text_states [L, T] float32` (a frozen encoder's states, cached by
the pipeline), packed slot for slot with `text_tokens`.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

VIDEO_FEATURES = ("tokens", "coords", "cond_mask")
TEXT_FEATURE = "text_tokens"
TEXT_STATES = "text_states"
BATCH_KEYS = ("tokens", "coords", "segment_ids", "cond_mask", "text_tokens", "text_segment_ids")

_PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}


def _fit_example(example: dict[str, Any], seq_len: int, text_len: int,
                 text_pad_len: int = 0) -> dict[str, np.ndarray]:
    n = example["tokens"].shape[0]
    if n > seq_len:
        # Cutting a clip would leave a partial grid that no longer unpacks: the token budget upstream
        # (data.sizing) is what keeps clips within a row.
        raise ValueError(f"a clip of {n} tokens does not fit a packed row of seq_len={seq_len}; "
                         "lower the data token budget or raise seq_len")
    if n == 0:
        raise ValueError("a clip with zero tokens cannot be packed")
    text = np.asarray(example[TEXT_FEATURE], np.int32)[:text_len]
    if text.size == 0:
        raise ValueError("every clip needs at least one text token (use the tokenizer's empty-caption id)")
    fitted = {
        "tokens": np.asarray(example["tokens"], np.float32),
        "coords": np.asarray(example["coords"], np.int32),
        "cond_mask": np.asarray(example["cond_mask"], bool),
        TEXT_FEATURE: text,
    }
    if TEXT_STATES in example:
        states = np.asarray(example[TEXT_STATES], np.float32)
        if states.shape[0] != len(example[TEXT_FEATURE]):
            raise ValueError(f"text_states has {states.shape[0]} rows for {len(example[TEXT_FEATURE])} text tokens")
        fitted[TEXT_STATES] = states[:text_len]
    pad = min(text_pad_len, text_len) - len(text)
    if pad > 0:
        # Wan's pipeline feeds its DiT each caption zero-padded to 512 states, and attends to the padding:
        # the caption takes that many slots of its row, pad tokens (id 0) whose cached states are zeros.
        fitted[TEXT_FEATURE] = np.concatenate([text, np.zeros(pad, np.int32)])
        if TEXT_STATES in fitted:
            states = fitted[TEXT_STATES]
            fitted[TEXT_STATES] = np.concatenate([states, np.zeros((pad, states.shape[1]), states.dtype)])
    return fitted


def to_batch_format(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packed row -> DESIGN.md's batch row (positions are dropped: they derive from segment ids)."""
    row = {
        "tokens": packed["tokens"],
        "coords": packed["coords"],
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "cond_mask": packed["cond_mask"].astype(bool),
        "text_tokens": packed[TEXT_FEATURE].astype(np.int32),
        "text_segment_ids": packed[TEXT_FEATURE + "_segment_ids"].astype(np.int32),
    }
    if TEXT_STATES in packed:
        row[TEXT_STATES] = packed[TEXT_STATES].astype(np.float32)
    return row


def pack_clips(dataset: grain.IterDataset, *, seq_len: int, text_len: int, max_segments: int,
               num_packing_bins: int = 8, strategy: str = "best_fit", seed: int = 0,
               with_text_states: bool = False, text_pad_len: int = 0) -> grain.IterDataset:
    """Packs one-clip examples into rows of `seq_len` video tokens and `text_len` text tokens (and, with
    `with_text_states`, each example's `text_states` alongside its text tokens). With `text_pad_len` each
    caption shorter than that is padded to it (pad id 0, zero states) inside its own text segment."""
    if strategy not in _PACKERS:
        raise ValueError(f"packing strategy {strategy!r} is not one of {sorted(_PACKERS)}")
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    dataset = dataset.map(lambda ex: _fit_example(ex, seq_len, text_len, text_pad_len))
    lengths = {"tokens": seq_len, "coords": seq_len, "cond_mask": seq_len, TEXT_FEATURE: text_len}
    if with_text_states:
        lengths[TEXT_STATES] = text_len
    packed = _PACKERS[strategy](
        dataset, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed,
        shuffle_bins=True, max_sequences_per_bin=max_segments)
    return packed.map(to_batch_format)


def unpack_row(row: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One packed row (no batch axis) -> its clips, in segment order, each with its `grid` shape."""
    segment_ids = np.asarray(row["segment_ids"])
    text_segment_ids = np.asarray(row["text_segment_ids"])
    clips = []
    for seg in np.unique(segment_ids[segment_ids > 0]):
        where = segment_ids == seg
        coords = np.asarray(row["coords"])[where]
        grid = tuple(int(v) + 1 for v in coords.max(axis=0))
        if int(np.prod(grid)) != int(where.sum()):
            raise ValueError(f"segment {seg} has {int(where.sum())} tokens but its coords span grid {grid}")
        clips.append({
            "segment_id": int(seg),
            "grid": grid,
            "tokens": np.asarray(row["tokens"])[where],
            "coords": coords,
            "cond_mask": np.asarray(row["cond_mask"])[where],
            "text_tokens": np.asarray(row["text_tokens"])[text_segment_ids == seg],
        })
    return clips


def packing_stats(segment_ids) -> dict[str, float]:
    """Real tokens, slots and their ratio for a batch (or row) of segment ids."""
    segment_ids = np.asarray(segment_ids)
    real = int((segment_ids > 0).sum())
    slots = int(segment_ids.size)
    rows = segment_ids.reshape(-1, segment_ids.shape[-1])
    segments = sum(len(np.unique(r[r > 0])) for r in rows)
    return {"real_tokens": real, "slots": slots, "efficiency": real / max(slots, 1),
            "segments_per_row": segments / max(len(rows), 1)}


def segment_token_counts(segment_ids_BxS, max_segments: int):
    """int32 [B, M+1]: tokens of each segment id 0..M (entry 0 counts padding)."""
    ids_M = jnp.arange(max_segments + 1, dtype=segment_ids_BxS.dtype)
    one_hot_BxSxM = segment_ids_BxS[..., None] == ids_M[None, None, :]
    return one_hot_BxSxM.sum(axis=1).astype(jnp.int32)


def positions_from_segment_ids(segment_ids_BxS):
    """int32 [B, S]: each token's index within its own segment (0 at a segment's first token).

    Packed segments are contiguous, so a segment starts where the id changes.
    """
    s = segment_ids_BxS.shape[-1]
    index_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids_BxS.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxS[..., :1], dtype=bool),
         segment_ids_BxS[..., 1:] != segment_ids_BxS[..., :-1]], axis=-1)
    start_BxS = jnp.where(is_start, index_BxS, 0)
    start_BxS = jax.lax.cummax(start_BxS, axis=start_BxS.ndim - 1)
    return index_BxS - start_BxS

"""The one check every text encoder makes of its packed caption rows (soraax/packing.py lays them out)."""

from __future__ import annotations


def check_rows(tokens_BxL, segment_ids_BxL, max_positions: int | None = None, name: str = "the encoder") -> None:
    """ValueError unless tokens and segment ids are both [B, L] and, with `max_positions`, L fits them: a
    caption's positions lie below the row length, so a row no longer than the positions always has an
    embedding for every position."""
    if tokens_BxL.ndim != 2 or tokens_BxL.shape != segment_ids_BxL.shape:
        raise ValueError(f"text_tokens and text_segment_ids must both be [B, L]; "
                         f"got {tokens_BxL.shape} and {segment_ids_BxL.shape}")
    if max_positions is not None and tokens_BxL.shape[1] > max_positions:
        raise ValueError(f"text row length {tokens_BxL.shape[1]} exceeds {name}'s {max_positions} positions "
                         f"(config.text_len)")

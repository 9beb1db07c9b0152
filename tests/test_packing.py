"""Patch n' Pack: Grain's packers plus unpacking, the segment cap, and per-segment quantities."""
import grain
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from soraax import packing, patches

P = 4  # patch dim in these tests


def _clip(rng, grid, text_len, cond_frames=0):
    latent = rng.normal(size=(*grid, P)).astype(np.float32)
    tokens, coords = patches.patchify(latent, (1, 1, 1))
    return {"tokens": tokens, "coords": coords, "cond_mask": coords[:, 0] < cond_frames,
            "text_tokens": rng.integers(1, 200, size=text_len).astype(np.int32)}


def _pack(clips, seq_len=64, text_len=24, max_segments=4, strategy="first_fit"):
    ds = grain.MapDataset.source(clips).to_iter_dataset()
    return list(packing.pack_clips(ds, seq_len=seq_len, text_len=text_len, max_segments=max_segments,
                                   num_packing_bins=3, strategy=strategy))


@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
                       min_size=1, max_size=10),
       strategy=st.sampled_from(["first_fit", "best_fit"]))
def test_pack_then_unpack_returns_every_clip_exactly(shapes, strategy):
    rng = np.random.default_rng(len(shapes))
    clips = [_clip(rng, (t, h, w), l, cond_frames=t // 2) for t, h, w, l in shapes]
    rows = _pack(clips, strategy=strategy)
    recovered = [c for row in rows for c in packing.unpack_row(row)]
    assert len(recovered) == len(clips)
    # Packing may reorder clips; match them by content.
    by_key = {c["tokens"].tobytes(): c for c in clips}
    for got in recovered:
        want = by_key[got["tokens"].tobytes()]
        assert got["grid"] == patches.grid_from_coords(want["coords"])
        np.testing.assert_array_equal(got["coords"], want["coords"])
        np.testing.assert_array_equal(got["cond_mask"], want["cond_mask"])
        np.testing.assert_array_equal(got["text_tokens"], want["text_tokens"])
        np.testing.assert_array_equal(patches.unpatchify(got["tokens"], got["grid"], (1, 1, 1)),
                                      patches.unpatchify(want["tokens"], got["grid"], (1, 1, 1)))


def test_rows_have_the_batch_format_and_cap_segments():
    rng = np.random.default_rng(0)
    clips = [_clip(rng, (1, 2, 2), 3) for _ in range(20)]  # 4 tokens each: 16 would fit a row
    rows = _pack(clips, seq_len=64, max_segments=3)
    for row in rows:
        assert set(row) == set(packing.BATCH_KEYS)
        assert row["tokens"].shape == (64, P) and row["coords"].shape == (64, 3)
        assert row["segment_ids"].dtype == np.int32 and row["text_segment_ids"].shape == (24,)
        assert row["segment_ids"].max() <= 3
        # Text segment k belongs to video segment k.
        assert set(np.unique(row["text_segment_ids"])) - {0} == set(np.unique(row["segment_ids"])) - {0}


def test_oversized_clip_is_refused_with_a_clear_error():
    rng = np.random.default_rng(0)
    import pytest
    with pytest.raises(ValueError, match="does not fit a packed row of seq_len=8"):
        _pack([_clip(rng, (1, 3, 3), 2)], seq_len=8)


def test_packing_stats():
    stats = packing.packing_stats(np.array([[1, 1, 2, 0], [1, 0, 0, 0]]))
    assert stats == {"real_tokens": 4, "slots": 8, "efficiency": 0.5, "segments_per_row": 1.5}


def test_segment_token_counts_and_positions():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 1, 1, 1, 1, 0]], jnp.int32)
    np.testing.assert_array_equal(packing.segment_token_counts(seg, 3), [[2, 3, 2, 0], [1, 4, 0, 2]])
    np.testing.assert_array_equal(packing.positions_from_segment_ids(seg),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 0]])

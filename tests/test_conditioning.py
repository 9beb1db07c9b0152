"""Training-time random conditioning: masks hold whole time patches in patchify order, never every token and
never an image's, each kind holds the shape of frames it names, its rate is met, and a generator decides all."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from soraax import patches
from soraax.data.conditioning import KINDS, held_time_patches, random_cond_mask

ALL = dict(first_frame_rate=0.25, past_frames_rate=0.25, future_frames_rate=0.25, ends_rate=0.25)


@settings(max_examples=60, deadline=None)
@given(grid=st.tuples(st.integers(1, 9), st.integers(1, 4), st.integers(1, 4)), seed=st.integers(0, 2**32 - 1))
def test_masks_hold_whole_time_patches_in_token_order_and_never_all(grid, seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        mask = random_cond_mask(grid, rng, **ALL)
        t, h, w = grid
        assert mask.shape == (t * h * w,) and mask.dtype == bool
        held_t = mask.reshape(t, h * w)[:, 0]
        # Token i is held iff its time patch is: the coordinates patchify gives the token.
        np.testing.assert_array_equal(mask, held_t[patches.grid_coords(grid)[:, 0]])
        assert not mask.all()
        if t == 1:
            assert not mask.any()


def _kind(held_t):
    """The kind a held pattern is, read from its shape (a one-patch prefix reads as first_frame)."""
    t = len(held_t)
    if not held_t.any():
        return None
    runs = np.flatnonzero(np.diff(np.concatenate([[0], held_t.astype(int), [0]])))
    starts, ends = runs[::2], runs[1::2]
    if len(starts) == 2 and starts[0] == 0 and ends[1] == t:
        return "ends"
    assert len(starts) == 1, held_t
    if starts[0] == 0:
        return "first_frame" if ends[0] == 1 else "past_frames"
    assert ends[0] == t, held_t
    return "future_frames"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_holds_what_it_names_at_its_rate(kind):
    rng, t, n, rate = np.random.default_rng(0), 6, 4000, 0.3
    draws = [held_time_patches(t, rng, **{f"{kind}_rate": rate}) for _ in range(n)]
    seen = [_kind(d) for d in draws]
    held = sum(s is not None for s in seen)
    assert abs(held / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n)  # 4 sigma
    expected = {"first_frame"} if kind == "first_frame" else {kind, "first_frame"} if kind == "past_frames" else {kind}
    assert {s for s in seen if s is not None} <= expected
    if kind in ("past_frames", "future_frames"):  # k uniform in 1..t-1: every length occurs, mean t/2
        lengths = [int(d.sum()) for d in draws if d.any()]
        assert set(lengths) == set(range(1, t)) and abs(np.mean(lengths) - t / 2) < 0.15


def test_rates_add_up_and_ends_need_three_time_patches():
    rng, n = np.random.default_rng(1), 4000
    held = np.mean([held_time_patches(5, rng, **ALL).any() for _ in range(n)])
    assert held == 1.0  # the rates sum to 1: every clip long enough holds something
    rates = dict(first_frame_rate=0.1, past_frames_rate=0.2, future_frames_rate=0.05, ends_rate=0.15)
    held = np.mean([held_time_patches(5, rng, **rates).any() for _ in range(n)])
    assert abs(held - 0.5) < 4 * np.sqrt(0.25 / n)
    assert not any(held_time_patches(2, rng, ends_rate=1.0).any() for _ in range(50))
    assert all(_kind(held_time_patches(3, rng, ends_rate=1.0)) == "ends" for _ in range(50))


def test_the_generator_decides_every_mask():
    def masks(seed):
        rng = np.random.default_rng(seed)
        return [random_cond_mask((5, 2, 3), rng, **ALL) for _ in range(20)]

    for a, b in zip(masks(7), masks(7)):
        np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(masks(7), masks(8)))


def test_bad_rates_are_refused_by_name():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="sum to at most 1.*past_frames"):
        random_cond_mask((3, 1, 1), rng, first_frame_rate=0.6, past_frames_rate=0.6)
    with pytest.raises(ValueError, match=">= 0"):
        random_cond_mask((3, 1, 1), rng, ends_rate=-0.1)

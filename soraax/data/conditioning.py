"""Random conditioning for training: which of a clip's tokens are given clean (`cond_mask`), so that one
model learns text->video and the sampling-time capabilities (soraax/capabilities.py) together.

Each clip draws one kind, with the given rates (the rest of the time it holds nothing):
  first_frame    time patch 0                                   image->video
  past_frames    time patches 0..k-1, k uniform in 1..t-1       forward extension (a prefix of the clip)
  future_frames  time patches t-k..t-1, k uniform in 1..t-1     backward extension (a suffix)
  ends           0..a-1 and t-b..t-1, a, b >= 1, a + b <= t-1   connecting clips, loops
Held tokens are whole time patches, never all of them (at least one time patch is left to learn), and an
image (t == 1) holds nothing. Where a clip has too few time patches for its kind (ends with t == 2) it
holds nothing, so a kind's rate is exact only for clips long enough for it.

The mask follows `soraax.patches.patchify` token order, time patches leading: the tokens of time patch i
are the i-th run of h*w tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KINDS = ("first_frame", "past_frames", "future_frames", "ends")


def held_time_patches(num_time_patches: int, rng: np.random.Generator, *, first_frame_rate: float = 0.0,
                      past_frames_rate: float = 0.0, future_frames_rate: float = 0.0,
                      ends_rate: float = 0.0) -> np.ndarray:
    """bool [t]: which time patches of a clip of `num_time_patches` are held, drawn from `rng`."""
    rates = np.array([first_frame_rate, past_frames_rate, future_frames_rate, ends_rate], np.float64)
    if (rates < 0).any() or rates.sum() > 1.0 + 1e-9:
        raise ValueError(f"conditioning rates must be >= 0 and sum to at most 1; got "
                         f"{dict(zip(KINDS, rates.tolist()))}")
    t = int(num_time_patches)
    if t < 1:
        raise ValueError(f"a clip has at least one time patch; got {t}")
    held = np.zeros(t, bool)
    u = rng.random()
    kind = int(np.searchsorted(np.cumsum(rates), u, side="right"))
    if t == 1 or kind == len(KINDS):  # an image holds nothing: there would be nothing left to generate
        return held
    name = KINDS[kind]
    if name == "first_frame":
        held[0] = True
    elif name == "past_frames":
        held[:rng.integers(1, t)] = True
    elif name == "future_frames":
        held[t - rng.integers(1, t):] = True
    elif t >= 3:  # ends: a >= 1 at the start, b >= 1 at the end, one time patch free at least
        total = rng.integers(2, t)          # a + b in 2..t-1
        start = rng.integers(1, total)      # a in 1..total-1
        held[:start] = True
        held[t - (total - start):] = True
    return held


def random_cond_mask(grid: Sequence[int], rng: np.random.Generator, *, first_frame_rate: float = 0.0,
                     past_frames_rate: float = 0.0, future_frames_rate: float = 0.0,
                     ends_rate: float = 0.0) -> np.ndarray:
    """bool [N = t*h*w]: the cond_mask of a clip with patch grid (t, h, w), in patchify token order."""
    t, h, w = (int(g) for g in grid)
    held_t = held_time_patches(t, rng, first_frame_rate=first_frame_rate, past_frames_rate=past_frames_rate,
                               future_frames_rate=future_frames_rate, ends_rate=ends_rate)
    return np.repeat(held_t, h * w)

"""Fractional clip positions: read from each clip's own tokens (packing stays exact), translation-free, and
the one signal that lets a DiT tell a clip's edges apart when its tokens all look alike."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soraax import dit, patches
from soraax.clip_position import clip_bounds, clip_position_features, num_features
from helpers import perturb

GRIDS = ((2, 3, 4), (1, 2, 5), (3, 1, 1))


def _row(grids, seq_len, offsets=None):
    """coords [1, S, 3] and segment ids [1, S] of clips packed in order, then padding (coords 0)."""
    coords = np.zeros((seq_len, 3), np.int32)
    ids = np.zeros(seq_len, np.int32)
    start = 0
    for k, grid in enumerate(grids, start=1):
        n = int(np.prod(grid))
        coords[start:start + n] = patches.grid_coords(grid) + (0 if offsets is None else offsets[k - 1])
        ids[start:start + n] = k
        start += n
    return jnp.asarray(coords)[None], jnp.asarray(ids)[None]


def test_bounds_are_each_clips_own_grid():
    coords, ids = _row(GRIDS, 64, offsets=[(0, 0, 0), (5, 2, 7), (1, 0, 3)])
    first, extent = clip_bounds(coords, ids)
    start = 0
    for k, grid in enumerate(GRIDS):
        n = int(np.prod(grid))
        np.testing.assert_array_equal(extent[0, start:start + n], np.broadcast_to(grid, (n, 3)))
        np.testing.assert_array_equal(first[0, start:start + n],
                                      np.broadcast_to([(0, 0, 0), (5, 2, 7), (1, 0, 3)][k], (n, 3)))
        start += n


def test_features_of_a_packed_clip_are_its_features_alone_and_ignore_translation():
    coords, ids = _row(GRIDS, 64)
    packed = clip_position_features(coords, ids)
    assert packed.shape == (1, 64, num_features(4))
    start = 0
    for grid in GRIDS:
        n = int(np.prod(grid))
        alone = clip_position_features(*_row([grid], n))
        moved = clip_position_features(*_row([grid], n + 3, offsets=[(4, 9, 2)]))
        np.testing.assert_allclose(packed[0, start:start + n], alone[0], atol=1e-6)
        np.testing.assert_allclose(moved[0, :n], alone[0], atol=1e-6)
        start += n


def test_the_two_edges_of_a_clip_differ_and_mirror():
    coords, ids = _row([(1, 1, 6)], 6)
    f = np.asarray(clip_position_features(coords, ids, bands=4))[0]
    w_sin, w_cos = slice(2 * 9 + 0, 2 * 9 + 4), slice(2 * 9 + 4, 2 * 9 + 8)  # the w axis' harmonics
    left, right = f[0], f[5]
    np.testing.assert_allclose(left[w_sin], right[w_sin] * np.array([1, -1, 1, -1]), atol=1e-6)
    np.testing.assert_allclose(left[w_cos], -right[w_cos] * np.array([1, -1, 1, -1]), atol=1e-6)
    assert left[w_cos][0] > 0.9 and right[w_cos][0] < -0.9
    np.testing.assert_allclose(f[:, 2 * 9 + 8], np.log(6.0), rtol=1e-6)


def _dit_outputs(clip_position: bool, tokens, coords, ids, text_ids):
    model = dit.DiT(patch_dim=tokens.shape[-1], width=32, depth=2, heads=2, mlp_ratio=2.0,
                    clip_position=clip_position)
    s = tokens.shape[1]
    args = dict(tokens_BxSxP=tokens, coords_BxSx3=coords, segment_ids_BxS=ids, t_BxS=jnp.full((1, s), 0.9),
                text_BxLxT=jnp.ones((1, text_ids.shape[1], 8)), text_segment_ids_BxL=text_ids)
    key = jax.random.PRNGKey(0)
    params = perturb(nn.meta.unbox(jax.jit(model.init)(key, **args)), key, 0.3)
    return jax.jit(model.apply)(params, **args)[0], model, params


def test_a_uniform_clip_tells_its_edges_apart_only_with_clip_position():
    # At high noise every token of a clip looks alike; RoPE alone then gives every token the same output
    # (attention averages equal values), so no caption can place an object left or right.
    grid = (2, 2, 6)
    n = int(np.prod(grid))
    coords, ids = _row([grid], n)
    tokens = jnp.ones((1, n, 8))
    text_ids = jnp.ones((1, 3), jnp.int32)
    rope_only, _, _ = _dit_outputs(False, tokens, coords, ids, text_ids)
    np.testing.assert_allclose(rope_only, jnp.broadcast_to(rope_only[0], rope_only.shape), atol=1e-5)
    with_position, _, _ = _dit_outputs(True, tokens, coords, ids, text_ids)
    left = with_position[coords[0, :, 2] == 0]
    right = with_position[coords[0, :, 2] == grid[2] - 1]
    assert float(jnp.abs(left - right).max()) > 1e-2


def test_dit_with_clip_position_keeps_packing_exact():
    key = jax.random.PRNGKey(1)
    seq_len = 48
    coords, ids = _row(GRIDS[:2], seq_len)
    tokens = jax.random.normal(key, (1, seq_len, 8))
    packed, model, params = _dit_outputs(True, tokens, coords, ids, jnp.array([[1, 1, 2, 2]], jnp.int32))
    start = 0
    for grid in GRIDS[:2]:
        n = int(np.prod(grid))
        alone_coords, alone_ids = _row([grid], n)
        alone = jax.jit(model.apply)(params, tokens[:, start:start + n], alone_coords, alone_ids,
                                     jnp.full((1, n), 0.9), jnp.ones((1, 2, 8)), jnp.ones((1, 2), jnp.int32))[0]
        np.testing.assert_allclose(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n

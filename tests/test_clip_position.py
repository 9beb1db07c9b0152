"""Fractional clip positions: read from each clip's own tokens (packing stays exact), translation-free, and
the one signal that lets a DiT tell a clip's edges apart when its tokens all look alike."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("pairs", [False, True])
def test_features_of_a_packed_clip_are_its_features_alone_and_ignore_translation(pairs):
    coords, ids = _row(GRIDS, 64)
    packed = clip_position_features(coords, ids, pairs=pairs)
    assert packed.shape == (1, 64, num_features(4, pairs))
    start = 0
    for grid in GRIDS:
        n = int(np.prod(grid))
        alone = clip_position_features(*_row([grid], n), pairs=pairs)
        moved = clip_position_features(*_row([grid], n + 3, offsets=[(4, 9, 2)]), pairs=pairs)
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


def test_pairs_add_every_product_of_two_axes_harmonics():
    coords, ids = _row([(3, 4, 5)], 60)
    single = np.asarray(clip_position_features(coords, ids, bands=2))[0]
    both = np.asarray(clip_position_features(coords, ids, bands=2, pairs=True))[0]
    assert num_features(2) == 15 and num_features(2, pairs=True) == 15 + 3 * 16 == both.shape[-1]
    np.testing.assert_array_equal(both[:, :15], single)
    harmonics = single.reshape(60, 3, 5)[:, :, :4]  # per axis: 2 sines, 2 cosines (the log extent dropped)
    th = both[:, 15:31].reshape(60, 4, 4)
    np.testing.assert_allclose(th, harmonics[:, 0, :, None] * harmonics[:, 1, None, :], atol=1e-6)
    hw = both[:, 47:63].reshape(60, 4, 4)
    np.testing.assert_allclose(hw, harmonics[:, 1, :, None] * harmonics[:, 2, None, :], atol=1e-6)


@pytest.mark.parametrize("pairs, linear", [(False, False), (True, True)])
def test_an_object_moving_left_is_linear_in_the_features_only_with_pairs(pairs, linear):
    # "Moving left" is where the object is at each time: a function of (t, w) together. The first layer
    # is linear in the features, so a layout the features cannot express linearly must be built by later
    # layers from a token's content, which at high noise is noise.
    grid = (5, 1, 10)
    coords, ids = _row([grid], 50)
    features = np.asarray(clip_position_features(coords, ids, pairs=pairs))[0].astype(np.float64)
    t, w = np.asarray(coords[0, :, 0]), np.asarray(coords[0, :, 2])
    occupied = (np.abs(w - (7.5 - 1.5 * t)) < 1.5).astype(np.float64)  # a 3-cell object, 1.5 cells left a frame
    design = np.concatenate([features, np.ones((50, 1))], axis=1)
    fit = design @ np.linalg.lstsq(design, occupied, rcond=None)[0]
    residual = np.linalg.norm(fit - occupied) / np.linalg.norm(occupied - occupied.mean())
    assert (residual < 0.1) if linear else (residual > 0.5), residual


def _dit_outputs(clip_position: bool, tokens, coords, ids, text_ids, pairs: bool = False):
    model = dit.DiT(patch_dim=tokens.shape[-1], width=32, depth=2, heads=2, mlp_ratio=2.0,
                    clip_position=clip_position, clip_position_pairs=pairs)
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


@pytest.mark.parametrize("pairs", [False, True])
def test_dit_with_clip_position_keeps_packing_exact(pairs):
    key = jax.random.PRNGKey(1)
    seq_len = 48
    coords, ids = _row(GRIDS[:2], seq_len)
    tokens = jax.random.normal(key, (1, seq_len, 8))
    packed, model, params = _dit_outputs(True, tokens, coords, ids, jnp.array([[1, 1, 2, 2]], jnp.int32), pairs)
    start = 0
    for grid in GRIDS[:2]:
        n = int(np.prod(grid))
        alone_coords, alone_ids = _row([grid], n)
        alone = jax.jit(model.apply)(params, tokens[:, start:start + n], alone_coords, alone_ids,
                                     jnp.full((1, n), 0.9), jnp.ones((1, 2, 8)), jnp.ones((1, 2), jnp.int32))[0]
        # float32 rounding only. With pairs, 219 features feed one Dense and the outputs grow (~30 here), so
        # the rounding grows with them: there the bound is relative to the largest output.
        atol = 1e-5 * float(jnp.abs(alone).max()) if pairs else 1e-5
        np.testing.assert_allclose(packed[start:start + n], alone, atol=atol, rtol=1e-5)
        start += n


def test_pairs_without_clip_position_are_refused():
    with pytest.raises(ValueError, match="set clip_position=True too"):
        _dit_outputs(False, jnp.ones((1, 4, 8)), *_row([(1, 2, 2)], 4), jnp.ones((1, 2), jnp.int32), pairs=True)

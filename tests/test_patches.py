"""patchify/unpatchify are exact inverses, and coordinates say where each token came from."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from soraax import patches


@settings(max_examples=40, deadline=None)
@given(pt=st.integers(1, 2), ph=st.integers(1, 3), pw=st.integers(1, 3), nt=st.integers(1, 3),
       nh=st.integers(1, 4), nw=st.integers(1, 4), c=st.integers(1, 3))
def test_patchify_unpatchify_exact_inverse(pt, ph, pw, nt, nh, nw, c):
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(nt * pt, nh * ph, nw * pw, c)).astype(np.float32)
    tokens, coords = patches.patchify(latent, (pt, ph, pw))
    assert tokens.shape == (nt * nh * nw, pt * ph * pw * c)
    assert coords.dtype == np.int32
    assert patches.grid_from_coords(coords) == (nt, nh, nw)
    np.testing.assert_array_equal(patches.unpatchify(tokens, (nt, nh, nw), (pt, ph, pw)), latent)


def test_coords_locate_each_patch():
    latent = np.arange(2 * 4 * 6 * 1, dtype=np.float32).reshape(2, 4, 6, 1)
    tokens, coords = patches.patchify(latent, (1, 2, 2))
    for token, (t, h, w) in zip(tokens, coords):
        np.testing.assert_array_equal(token, latent[t, 2 * h:2 * h + 2, 2 * w:2 * w + 2, :].reshape(-1))


def test_time_prefix_is_sequence_prefix():
    # Conditioning on the first latent frames (image->video, extension) relies on this ordering.
    latent = np.zeros((3, 4, 4, 2), np.float32)
    _, coords = patches.patchify(latent, (1, 2, 2))
    assert np.all(np.diff(coords[:, 0]) >= 0)


def test_works_on_jax_arrays():
    import jax.numpy as jnp
    latent = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    tokens, _ = patches.patchify(latent, (1, 2, 2))
    np.testing.assert_array_equal(patches.unpatchify(tokens, (2, 2, 2), (1, 2, 2)), latent)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="H=5 is not a multiple of patch size 2"):
        patches.patchify(np.zeros((1, 5, 4, 3)), (1, 2, 2))
    with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
        patches.patchify(np.zeros((5, 4, 3)), (1, 2, 2))
    with pytest.raises(ValueError, match="do not fill grid"):
        patches.unpatchify(np.zeros((7, 12)), (1, 2, 2), (1, 2, 2))

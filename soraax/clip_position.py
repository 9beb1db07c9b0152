"""Where a token sits in its own clip: fractional (t, h, w) coordinates, the DiT's one absolute position signal.

3D RoPE gives attention relative offsets only, and the DiT's inputs carry no position: at high noise every
token of a clip looks alike, so no layer can tell the clip's left edge from its right. A caption that names
a layout over time ("moving left": the object starts at the right and ends at the left) then has nothing to
act on, and a small DiT learns the mean over directions: a still object. Fractions of the clip's own grid
(NaViT's fractional positions, Dehghani et al. 2023) mean the same place at every size and aspect ratio, and
each clip's extent is read from its own tokens only, so a packed row gives every clip the features it gets
alone.

Dimension key: B batch rows, S packed tokens, F features (`num_features`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AXES = 3  # (t, h, w)


AXIS_PAIRS = ((0, 1), (0, 2), (1, 2))  # (t, h), (t, w), (h, w)


def num_features(bands: int, pairs: bool = False) -> int:
    """Per axis: sin and cos of `bands` harmonics of the fraction, and the log of the clip's extent; with
    `pairs`, also every product of two axes' harmonics."""
    return AXES * (2 * bands + 1) + (len(AXIS_PAIRS) * (2 * bands) ** 2 if pairs else 0)


def clip_bounds(coords_BxSx3, segment_ids_BxS):
    """(first int32 [B, S, 3], extent int32 [B, S, 3]): the lowest coordinate and the grid size of each
    token's clip along (t, h, w), from that clip's tokens alone.

    Segment ids are at most S - 1 in a row of S tokens, so S segments always suffice; padding (id 0) gets
    the bounds of the padding, which nothing reads.
    """
    coords = coords_BxSx3.astype(jnp.int32)
    ids = segment_ids_BxS.astype(jnp.int32)
    num_segments = ids.shape[1]

    def per_token(reduce):
        per_row = jax.vmap(lambda c, i: reduce(c, i, num_segments=num_segments))(coords, ids)
        return jnp.take_along_axis(per_row, ids[..., None], axis=1)

    first = per_token(jax.ops.segment_min)
    return first, per_token(jax.ops.segment_max) - first + 1


def clip_position_features(coords_BxSx3, segment_ids_BxS, bands: int = 4, pairs: bool = False):
    """float32 [B, S, F]: harmonics of (coordinate - first + 0.5) / extent along each axis, and log(extent).
    A clip translated in (t, h, w) gets the same features, so RoPE's relative positions stay relative.

    Harmonic k is sin/cos(pi k f) for f in (0, 1): k = 1 already tells the two edges apart (cos is +1 at
    one, -1 at the other), higher ones resolve finer places; log(extent) tells a long clip from a short one.

    pairs: also the products of two axes' harmonics. A caption's layout over time ("moving left": at the
    right early, at the left late) is a function of (t, w) together; per-axis features make it a sum
    f(t) + g(w), which cannot place one object, and the first layer is linear in its features.
    """
    first, extents = clip_bounds(coords_BxSx3, segment_ids_BxS)
    extents = extents.astype(jnp.float32)
    fraction_BxSx3 = ((coords_BxSx3 - first).astype(jnp.float32) + 0.5) / extents
    k_1x1x1xK = jnp.arange(1, bands + 1, dtype=jnp.float32).reshape(1, 1, 1, bands)
    angles_BxSx3xK = jnp.pi * fraction_BxSx3[..., None] * k_1x1x1xK
    harmonics_BxSx3x2K = jnp.concatenate([jnp.sin(angles_BxSx3xK), jnp.cos(angles_BxSx3xK)], axis=-1)
    per_axis_BxSx3x2Kp1 = jnp.concatenate([harmonics_BxSx3x2K, jnp.log(extents)[..., None]], axis=-1)
    features = [per_axis_BxSx3x2Kp1.reshape(*per_axis_BxSx3x2Kp1.shape[:2], num_features(bands))]
    if pairs:
        for a, b in AXIS_PAIRS:
            products = jnp.einsum("bsi,bsj->bsij", harmonics_BxSx3x2K[:, :, a], harmonics_BxSx3x2K[:, :, b])
            features.append(products.reshape(*products.shape[:2], (2 * bands) ** 2))
    return jnp.concatenate(features, axis=-1)

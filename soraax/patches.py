"""Spacetime patches: the one place where latent shapes become token sequences and back.

A latent clip `(T, H, W, C)` is cut into non-overlapping `(pt, ph, pw)` blocks; each block is one token of
`pt*ph*pw*C` numbers, and its integer grid coordinate `(t, h, w)` travels with it. Tokens are ordered
t-major, then h, then w, so a clip's tokens are contiguous and a prefix in time is a prefix of the sequence
(image->video and extension condition on such prefixes). The grid shape is never stored: it is
`coords.max(0) + 1`, which is what lets Patch n' Pack rows carry clips of any shape.

Works on numpy arrays (data pipeline) and jax arrays (model, sampling) alike.

Dimension key: T,H,W latent frames/height/width; C channels; N tokens; P = pt*ph*pw*C.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PatchSize = tuple[int, int, int]


def _check_divisible(latent_shape: Sequence[int], patch_size: PatchSize) -> tuple[int, int, int]:
    if len(latent_shape) != 4:
        raise ValueError(f"latent must be (T, H, W, C); got shape {tuple(latent_shape)}")
    grid = []
    for axis, size, p in zip("THW", latent_shape[:3], patch_size):
        if p < 1 or size % p:
            raise ValueError(
                f"latent {axis}={size} is not a multiple of patch size {p} "
                f"(latent shape {tuple(latent_shape)}, patch_size {tuple(patch_size)})")
        grid.append(size // p)
    return tuple(grid)


def grid_shape(latent_shape: Sequence[int], patch_size: PatchSize) -> tuple[int, int, int]:
    """(nt, nh, nw): how many patches a latent of this shape has along each axis."""
    return _check_divisible(latent_shape, patch_size)


def num_tokens(latent_shape: Sequence[int], patch_size: PatchSize) -> int:
    nt, nh, nw = grid_shape(latent_shape, patch_size)
    return nt * nh * nw


def patch_dim(patch_size: PatchSize, channels: int) -> int:
    pt, ph, pw = patch_size
    return pt * ph * pw * channels


def grid_coords(grid: Sequence[int]) -> np.ndarray:
    """int32 [N, 3] (t, h, w) of every patch of a grid, in token order."""
    nt, nh, nw = grid
    t, h, w = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
    return np.stack([t.ravel(), h.ravel(), w.ravel()], axis=-1).astype(np.int32)


def patchify(latent_THWC, patch_size: PatchSize):
    """latent [T, H, W, C] -> (tokens [N, P], coords int32 [N, 3])."""
    nt, nh, nw = _check_divisible(latent_THWC.shape, patch_size)
    pt, ph, pw = patch_size
    c = latent_THWC.shape[-1]
    x = latent_THWC.reshape(nt, pt, nh, ph, nw, pw, c)
    x = x.transpose(0, 2, 4, 1, 3, 5, 6)
    tokens_NxP = x.reshape(nt * nh * nw, pt * ph * pw * c)
    return tokens_NxP, grid_coords((nt, nh, nw))


def unpatchify(tokens_NxP, grid: Sequence[int], patch_size: PatchSize):
    """tokens [N, P] in token order of `grid` -> latent [T, H, W, C]; the exact inverse of `patchify`."""
    nt, nh, nw = (int(g) for g in grid)
    pt, ph, pw = patch_size
    n, p = tokens_NxP.shape
    if n != nt * nh * nw or p % (pt * ph * pw):
        raise ValueError(f"{n} tokens of size {p} do not fill grid {tuple(grid)} with patch {tuple(patch_size)}")
    c = p // (pt * ph * pw)
    x = tokens_NxP.reshape(nt, nh, nw, pt, ph, pw, c)
    x = x.transpose(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(nt * pt, nh * ph, nw * pw, c)


def grid_from_coords(coords_Nx3) -> tuple[int, int, int]:
    """A segment's grid shape is its coordinates' max + 1 (the batch stores no shapes)."""
    coords = np.asarray(coords_Nx3)
    if coords.size == 0:
        raise ValueError("cannot infer a grid from zero tokens")
    return tuple(int(v) + 1 for v in coords.max(axis=0))

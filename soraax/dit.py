"""The diffusion transformer over packed spacetime patches (DiT, Peebles & Xie 2023, made Sora-shaped).

What differs from an image DiT, and why:
  * inputs are PACKED rows: clips of any shape share a row and `segment_ids` keep them apart in
    self-attention (and tell cross-attention which caption belongs to which clip), so the output for each
    clip equals running it alone;
  * positions come from integer `(t, h, w)` coordinates through 3D rotary embeddings, so there is no
    learned position table and any resolution, aspect ratio or duration works; `clip_position` adds each
    token's fractional place in its own clip, the absolute signal a caption's layout needs
    (soraax/clip_position.py);
  * adaLN-Zero conditioning is PER TOKEN: each clip has its own timestep, and conditioning tokens
    (image->video, extension) have t = 0 inside the same row;
  * text enters by cross-attention to the clip's own caption, as in PixArt-alpha, and optionally
    (`pooled_text`) as the caption's mean embedding added to the timestep conditioning, as in SD3;
  * a super-resolution stage (`lowres_dim > 0`, soraax/cascade.py) is the same network that also sees the
    low-resolution latent upsampled onto its own patch grid: those tokens are concatenated to the noisy ones
    before the patch embedding (Imagen Video / CDM's channel concat), and their noise-augmentation level
    joins the timestep in adaLN. Both are per token, so packing stays exact.

The switches that make it Wan 2.1's transformer (Wan team 2025; diffusers' WanTransformer3DModel), so its open
weights load into this module rather than into a copy of it (soraax/wan/):
  * `modulation="shared"`: one projection of the timestep embedding gives the 6 adaLN vectors for all
    blocks, and each block adds its own learned `scale_shift_table` [6, D]; the final layer adds a [2, D]
    table to the timestep embedding itself. Per token as everywhere here, so packing stays exact;
  * `qk_norm`: q and k RMS-normalised across heads in both attentions;
  * `text_mlp`: the caption projection is PixArt's two-layer MLP (Dense, GELU-tanh, Dense), not one Dense;
  * `mlp_dim`: an FFN width that is no round multiple of the width (1.3B: 8960 over 1536).
Wan's 3D RoPE needs no switch: its split of the head dim (h = w = 2 * (K // 6), t the rest), its per-axis
frequencies and its interleaved pairs are this module's.

Dimension key:
  B batch rows, S packed video tokens, L packed text tokens, P patch dim (pt*ph*pw*C), Q patch dim of the
  low-res conditioning tokens, D width, H heads, K head dim, F mlp width, T text width, N layers.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from soraax import local_attention
from soraax.clip_position import clip_position_features
from soraax.cond_slots import at_slots, conditioning_slots, gather_slots
from soraax.layers import Mlp, MultiHeadAttention
from soraax.matmul import dense_dot_general

# Sizes of the DiT paper (Table 1); patch size and latent channels come from the config.
DIT_S = dict(width=384, depth=12, heads=6)
DIT_B = dict(width=768, depth=12, heads=12)
DIT_L = dict(width=1024, depth=24, heads=16)
DIT_XL = dict(width=1152, depth=28, heads=16)
PRESETS = {"S": DIT_S, "B": DIT_B, "L": DIT_L, "XL": DIT_XL}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _dense_init(names):
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def timestep_embedding(t_BxS, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features of t in [0, 1] (scaled by 1000 as in DiT so frequencies resolve 1/1000 steps)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = (t_BxS.astype(jnp.float32) * 1000.0)[..., None] * freqs.reshape((1,) * t_BxS.ndim + (half,))
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """How many head dims rotate with t, h and w: even sizes, h and w equal, t takes the rest."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dim >= 6, got {head_dim}")
    hw = (head_dim // 3) // 2 * 2
    return head_dim - 2 * hw, hw, hw


def rope_angles(coords_BxSx3, *, head_dim: int, theta: float):
    """Rotation angles [B, S, K/2] from integer (t, h, w) coordinates: one frequency band per axis."""
    dims = rope_split(head_dim)
    parts = []
    for axis, dim in enumerate(dims):
        freqs = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        parts.append(coords_BxSx3[..., axis].astype(jnp.float32)[..., None] * freqs[None, None, :])
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x_BxSxHxK, angles_BxSxK2):
    """Rotates pairs (x[2i], x[2i+1]) by the token's angle; relative offsets survive the dot product."""
    cos = jnp.cos(angles_BxSxK2)[:, :, None, :]
    sin = jnp.sin(angles_BxSxK2)[:, :, None, :]
    x = x_BxSxHxK.astype(jnp.float32).reshape(*x_BxSxHxK.shape[:-1], -1, 2)
    x_even, x_odd = x[..., 0], x[..., 1]
    rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
    return rotated.reshape(x_BxSxHxK.shape).astype(x_BxSxHxK.dtype)


def modulate(x_BxSxD, shift_BxSxD, scale_BxSxD):
    return x_BxSxD * (1.0 + scale_BxSxD) + shift_BxSxD


def _layer_norm(name: str, dtype):
    # adaLN supplies scale and shift, so the norm itself carries none (DiT).
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


class TimestepEmbedder(nn.Module):
    """Per-token timestep t [B, S] -> conditioning c [B, S, D] (or per slot, [B, M] -> [B, M, D])."""
    width: int
    freq_dim: int = 256
    dtype: Any = jnp.float32
    length_axis: str | None = "length"   # None for slots: few, and not split over the sequence's shards
    matmul_dtype: str | None = None      # the Dense layers' operand dtype (soraax/matmul.py); None: dtype

    @nn.compact
    def __call__(self, t_BxS):
        Dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=dense_dot_general(self.matmul_dtype))
        x = timestep_embedding(t_BxS, self.freq_dim)
        x = Dense(self.width, kernel_init=_dense_init((None, "embed")), name="fc1")(x)
        x = nn.silu(x)
        x = Dense(self.width, kernel_init=_dense_init(("mlp", "embed")), name="fc2")(x)
        return nn.with_logical_constraint(x, ("batch", self.length_axis, "embed"))


def segment_mean(values_BxLxT, value_segment_ids_BxL, query_segment_ids_BxS):
    """[B, S, T]: for each query token, the mean of the values of its own segment (0 where it has none).

    Padding (segment 0) on either side takes part in nothing, so a packed row gives each clip exactly the
    pooled embedding of its own caption.
    """
    match_BxSxL = ((query_segment_ids_BxS[:, :, None] == value_segment_ids_BxL[:, None, :])
                   & (value_segment_ids_BxL[:, None, :] > 0)).astype(jnp.float32)
    weights_BxSxL = match_BxSxL / jnp.maximum(match_BxSxL.sum(axis=-1, keepdims=True), 1.0)
    return jnp.einsum("bsl,blt->bst", weights_BxSxL, values_BxLxT.astype(jnp.float32))


def _table_init(rows: int):
    # Wan draws its tables N(0, 1/D); zeros would make a fresh "shared" model start exactly as adaLN-Zero.
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / jnp.sqrt(jnp.asarray(shape[-1], dtype))
    return nn.with_logical_partitioning(init, (None, "embed"))


MODULATIONS = ("per_block", "shared")


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention by segment, cross-attention to the segment's text, MLP.

    Written as a scan body: `(x, None) = block(x, c, ...)`. Gates start at zero, so every block starts as
    the identity (DiT's adaLN-Zero finding: the best-conditioned start for diffusion transformers).
    With `shared_modulation` the conditioning is already the 6 adaLN vectors, `[B, S, 6D]` from the DiT's
    `time_proj`, and the block adds its own table to them (Wan).
    """
    heads: int
    mlp_ratio: float = 4.0
    mlp_dim: int = 0
    cross_attn: bool = True
    qk_norm: bool = False
    shared_modulation: bool = False
    attn_impl: str = "xla"
    clip_tokens: int = 0
    dtype: Any = jnp.float32
    matmul_dtype: str | None = None

    @nn.compact
    def __call__(self, x_BxSxD, c_BxSxD, angles, segment_ids, text_BxLxD, text_segment_ids, slot_BxS=None,
                 local_fits=None):
        """`c` is per token [B, S, .], or per slot [B, M, .] with `slot_BxS` naming each token's slot.
        `local_fits`: the DiT's one check that the rows suit local self-attention (attention.attention)."""
        width = x_BxSxD.shape[-1]
        to_tokens = (lambda v: v) if slot_BxS is None else (lambda v: gather_slots(v, slot_BxS))
        if self.shared_modulation:
            table_6xD = self.param("scale_shift_table", _table_init(6), (6, width), jnp.float32)
            mod = c_BxSxD.reshape(*c_BxSxD.shape[:-1], 6, width) + table_6xD.astype(c_BxSxD.dtype)[None, None]
            mod = to_tokens(mod)
            shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = (mod[..., i, :] for i in range(6))
        else:
            mod = to_tokens(nn.Dense(6 * width, dtype=self.dtype, kernel_init=_zeros(("embed", "mlp")),
                                     dot_general=dense_dot_general(self.matmul_dtype),
                                     name="adaLN_modulation")(nn.silu(c_BxSxD)))
            shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

        h = modulate(_layer_norm("norm1", self.dtype)(x_BxSxD), shift_sa, scale_sa)
        h = MultiHeadAttention(self.heads, self.attn_impl, self.dtype, qk_norm=self.qk_norm,
                               local_max_len=self.clip_tokens, matmul_dtype=self.matmul_dtype, name="self_attn")(
            h, h, segment_ids, segment_ids, rotate=functools.partial(apply_rope, angles_BxSxK2=angles),
            local_fits=local_fits)
        x_BxSxD = x_BxSxD + gate_sa * h

        if self.cross_attn:
            h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_cross")(x_BxSxD)
            x_BxSxD = x_BxSxD + MultiHeadAttention(self.heads, self.attn_impl, self.dtype, qk_norm=self.qk_norm,
                                                   matmul_dtype=self.matmul_dtype, name="cross_attn")(
                h, text_BxLxD, segment_ids, text_segment_ids)

        h = modulate(_layer_norm("norm2", self.dtype)(x_BxSxD), shift_mlp, scale_mlp)
        hidden = self.mlp_dim or int(width * self.mlp_ratio)
        x_BxSxD = x_BxSxD + gate_mlp * Mlp(hidden, self.dtype, matmul_dtype=self.matmul_dtype, name="mlp")(h)
        return nn.with_logical_constraint(x_BxSxD, ("batch", "length", "embed")), None


class DiT(nn.Module):
    """Packed-sequence diffusion transformer: noisy patches + per-token t + text -> velocity per token.

    Fields are the hyper-parameters; `patch_dim` is pt*ph*pw*C of the latent patches. `lowres_dim` > 0 makes
    it a super-resolution stage whose call also takes `lowres_BxSxQ` (the low-res latent's tokens, aligned
    token for token) and `aug_BxS` (their noise-augmentation level); 0, the default, is the text-to-video
    model, with exactly the params and function it always had. `modulation`, `qk_norm`, `text_mlp` and
    `mlp_dim` are Wan 2.1's switches (module docstring); their defaults are the DiT as it always was.
    """
    patch_dim: int
    lowres_dim: int = 0
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    mlp_dim: int = 0             # FFN width; 0: width * mlp_ratio
    cross_attn: bool = True
    pooled_text: bool = False
    modulation: str = "per_block"   # per_block (DiT's adaLN-Zero) | shared (Wan: one time_proj + block tables)
    qk_norm: bool = False
    text_mlp: bool = False
    freq_dim: int = 256          # sinusoidal features of t before the timestep MLP
    cond_slots: int = 0          # > 0: adaLN computed per (clip, t) slot of a row (soraax/cond_slots.py); 0: per token
    clip_tokens: int = 0         # > 0: clips hold at most this many tokens, so self-attention computes only the
                                 # blocks a clip reaches (soraax/local_attention.py; exact, whole-row fallback)
    clip_position: bool = False  # also embed each token's fractional place in its clip (soraax/clip_position.py)
    clip_position_pairs: bool = False  # and the products of two axes' places: a layout over time, e.g. (t, w)
    rope_theta: float = 10_000.0
    attn_impl: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True
    dtype: Any = jnp.float32
    matmul_dtype: str | None = None  # the operands of every matmul (soraax/matmul.py), float32 sums; None: dtype

    def setup(self):
        if self.width % self.heads:
            raise ValueError(f"DiT width {self.width} is not divisible by heads {self.heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        rope_split(self.width // self.heads)
        if self.lowres_dim < 0:
            raise ValueError(f"lowres_dim must be >= 0 (0: no low-res conditioning), got {self.lowres_dim}")
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation {self.modulation!r} is not one of {MODULATIONS}")
        if self.mlp_dim < 0:
            raise ValueError(f"mlp_dim must be >= 0 (0: width * mlp_ratio), got {self.mlp_dim}")
        if self.cond_slots < 0:
            raise ValueError(f"cond_slots must be >= 0 (0: conditioning per token), got {self.cond_slots}")
        if self.clip_position_pairs and not self.clip_position:
            raise ValueError("clip_position_pairs adds to clip_position's features; set clip_position=True too")

    def _check_lowres(self, lowres_BxSxQ, aug_BxS, tokens_shape):
        if not self.lowres_dim:
            if lowres_BxSxQ is not None or aug_BxS is not None:
                raise ValueError("this DiT has lowres_dim=0 (no low-res conditioning) but was given lowres/aug inputs")
            return
        if lowres_BxSxQ is None or aug_BxS is None:
            raise ValueError(f"a super-resolution DiT (lowres_dim={self.lowres_dim}) needs lowres_BxSxQ and aug_BxS")
        if lowres_BxSxQ.shape != (*tokens_shape[:-1], self.lowres_dim) or aug_BxS.shape != tokens_shape[:-1]:
            raise ValueError(f"lowres_BxSxQ must be {(*tokens_shape[:-1], self.lowres_dim)} and aug_BxS "
                             f"{tuple(tokens_shape[:-1])}; got {lowres_BxSxQ.shape} and {aug_BxS.shape}")

    @nn.compact
    def __call__(self, tokens_BxSxP, coords_BxSx3, segment_ids_BxS, t_BxS, text_BxLxT, text_segment_ids_BxL,
                 lowres_BxSxQ=None, aug_BxS=None):
        """Returns the predicted velocity [B, S, P]; padding tokens (segment id 0) get exactly zero."""
        self._check_lowres(lowres_BxSxQ, aug_BxS, tokens_BxSxP.shape)
        Dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=dense_dot_general(self.matmul_dtype))
        inputs_BxSxP = tokens_BxSxP.astype(self.dtype)
        if self.lowres_dim:
            inputs_BxSxP = jnp.concatenate([inputs_BxSxP, lowres_BxSxQ.astype(self.dtype)], axis=-1)
        x_BxSxD = Dense(self.width, kernel_init=_dense_init((None, "embed")), name="patch_embed")(inputs_BxSxP)
        if self.clip_position:
            # RoPE is relative only: without this no token knows which edge of its clip it is near.
            features_BxSxF = clip_position_features(coords_BxSx3, segment_ids_BxS,
                                                    pairs=self.clip_position_pairs)
            x_BxSxD = x_BxSxD + Dense(self.width, kernel_init=_dense_init((None, "embed")),
                                      name="clip_position_embed")(features_BxSxF.astype(self.dtype))
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, ("batch", "length", "embed"))
        # The conditioning c below is per token [B, S, D], or with cond_slots per slot [B, M, D]: its inputs
        # (t, the clip's caption, aug) read at one token of each slot, and gathered back to tokens per block.
        slot_BxS, fits_B, cond_axis = None, None, "length"
        t_c, segment_ids_c, aug_c = t_BxS, segment_ids_BxS, aug_BxS
        if self.cond_slots:
            slot_BxS, first_BxM, fits_B = conditioning_slots(segment_ids_BxS, t_BxS, self.cond_slots, aug_BxS)
            t_c, segment_ids_c = at_slots(t_BxS, first_BxM), at_slots(segment_ids_BxS, first_BxM)
            aug_c = None if aug_BxS is None else at_slots(aug_BxS, first_BxM)
            cond_axis = None
        c_BxSxD = TimestepEmbedder(self.width, self.freq_dim, dtype=self.dtype, length_axis=cond_axis,
                                   matmul_dtype=self.matmul_dtype, name="t_embedder")(t_c)
        if self.lowres_dim:
            # The augmentation level tells the network how far to trust its conditioning (CDM, Ho et al. 2021):
            # trained over a range of levels, sampled at one fixed level (sr.sample_aug).
            c_BxSxD = c_BxSxD + TimestepEmbedder(self.width, dtype=self.dtype, length_axis=cond_axis,
                                                 matmul_dtype=self.matmul_dtype, name="aug_embedder")(aug_c)
        if self.pooled_text:
            # The caption's mean embedding joins the timestep in adaLN (as SD3's pooled text does): a global
            # signal every block sees from the first step, while cross-attention learns the details.
            pooled_BxSxT = segment_mean(text_BxLxT, text_segment_ids_BxL, segment_ids_c)
            c_BxSxD = c_BxSxD + Dense(self.width, kernel_init=_dense_init((None, "embed")),
                                      name="pooled_text_proj")(pooled_BxSxT.astype(self.dtype))
        angles = rope_angles(coords_BxSx3, head_dim=self.width // self.heads, theta=self.rope_theta)

        text_BxLxD = None
        if self.cross_attn:
            text_BxLxD = Dense(self.width, kernel_init=_dense_init((None, "embed")),
                               name="text_proj")(text_BxLxT.astype(self.dtype))
            text_BxLxD = nn.gelu(text_BxLxD, approximate=True)
            if self.text_mlp:
                text_BxLxD = Dense(self.width, kernel_init=_dense_init(("mlp", "embed")),
                                   name="text_proj_out")(text_BxLxD)
            text_BxLxD = nn.with_logical_constraint(text_BxLxD, ("batch", "text_length", "embed"))

        shared = self.modulation == "shared"
        block_c_BxSxD = c_BxSxD
        if shared:
            # [B, S, 6D] once, broadcast to every block: the one projection all of Wan's blocks share.
            block_c_BxSxD = Dense(6 * self.width, kernel_init=_zeros(("embed", "mlp")),
                                  name="time_proj")(nn.silu(c_BxSxD))

        block = DiTBlock
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            block = nn.remat(block, policy=policy, prevent_cse=not self.scan_layers)
        block_kwargs = dict(heads=self.heads, mlp_ratio=self.mlp_ratio, mlp_dim=self.mlp_dim,
                            cross_attn=self.cross_attn, qk_norm=self.qk_norm, shared_modulation=shared,
                            attn_impl=self.attn_impl, clip_tokens=self.clip_tokens, dtype=self.dtype,
                            matmul_dtype=self.matmul_dtype)
        local_fits = None
        seq_len = segment_ids_BxS.shape[1]
        if local_attention.applies(self.attn_impl, seq_len, seq_len, self.clip_tokens) is not None:
            # Once, not per layer inside the scan: a sort and two scatters a row, and every layer's ids are the same.
            local_fits = local_attention.fits(segment_ids_BxS, self.clip_tokens)
        args = (block_c_BxSxD, angles, segment_ids_BxS, text_BxLxD, text_segment_ids_BxL, slot_BxS, local_fits)
        if self.scan_layers:
            x_BxSxD, _ = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(args), length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**block_kwargs, name="blocks")(x_BxSxD, *args)
        else:
            for i in range(self.depth):
                x_BxSxD, _ = block(**block_kwargs, name=f"blocks_{i}")(x_BxSxD, *args)

        if shared:
            # Wan adds its final table to the timestep embedding itself: no SiLU, no projection.
            table_2xD = self.param("final_scale_shift_table", _table_init(2), (2, self.width), jnp.float32)
            shift = c_BxSxD + table_2xD[0].astype(c_BxSxD.dtype)[None, None]
            scale = c_BxSxD + table_2xD[1].astype(c_BxSxD.dtype)[None, None]
        else:
            shift, scale = jnp.split(Dense(2 * self.width, kernel_init=_zeros(("embed", "mlp")),
                                           name="final_modulation")(nn.silu(c_BxSxD)), 2, axis=-1)
        if slot_BxS is not None:
            shift, scale = gather_slots(shift, slot_BxS), gather_slots(scale, slot_BxS)
        x_BxSxD = modulate(_layer_norm("final_norm", self.dtype)(x_BxSxD), shift, scale)
        v_BxSxP = Dense(self.patch_dim, kernel_init=_zeros(("embed", None)), name="final_proj")(x_BxSxD)
        real_BxS = (segment_ids_BxS > 0)[..., None]
        v_BxSxP = jnp.where(real_BxS, v_BxSxP.astype(jnp.float32), 0.0)
        if fits_B is not None:
            # A row with more distinct (clip, t) than slots got some tokens another slot's conditioning: NaN,
            # never a wrong velocity that looks right (soraax/cond_slots.py).
            v_BxSxP = jnp.where(fits_B[:, None, None] | ~real_BxS, v_BxSxP, jnp.nan)
        return v_BxSxP

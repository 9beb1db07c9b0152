"""Causal 3D convolutional video VAE: pixels <-> the latent grid the diffusion transformer works in.

Every convolution is causal in time (frames are padded on the left only, with copies of the first frame), so
the latent of frames 0..k never depends on a later frame. Temporal downsampling is a stride-2 causal conv:
from `1 + 2n` frames it makes `1 + n`, and the first frame, having no past, is encoded alone. Hence an image
is a 1-frame video, `T = 1 + ft*n` frames become `1 + n` latent frames, and decoding gives the frames back
one for one. Normalisation is GroupNorm over each frame's (H, W, channels) only, because statistics pooled
over time would leak the future into the past.

Because nothing looks ahead, the decoder can run over a long latent clip a few frames at a time: each causal
conv keeps the last `K-1` frames it saw in a `cache` collection and pads the next chunk with them instead of
with copies of the first frame (`decode_chunked`). The result equals the whole-clip decode to float tolerance.

Latent scale and shift: `encode` returns `(mean - latent_mean) / latent_std` (and `logvar - 2 log
latent_std`), and `decode` undoes it first, so a diffusion model sees roughly unit-variance latents while
the VAE itself is unchanged. Train the VAE with the defaults (0, 1), then measure the statistics of its
latents with `latent_channel_stats` and pass them as fields. `__call__`, the training path, works in the
VAE's own latent space and returns the raw posterior, so the KL it feeds to `vae_loss` is independent of
those statistics.

Wan 2.1's VAE is this VAE with other switches (`VAE_WAN21`, loaded by `soraax.wan.vae_weights`): zero
time padding, RMS norm without epsilon, separable resampling (`SeparableDownsample`/`SeparableUpsample`:
per-frame 2D convs plus a (3,1,1) time conv through which frame 0 does not pass), per-frame attention in the
mid blocks, 1x1x1 quant convs around the latent, one more res block per decoder level, and time compressed
at the low-resolution stages. Wan runs its encoder on frame 0 then chunks of 4 frames and its decoder one
latent frame at a time, each conv carrying a cache; with zero padding that equals the whole-clip convs here.

Dimension key: B batch; T, H, W pixel frames/height/width; t, h, w latent frames/height/width;
C channels (3 for pixels, `latent_channels` for latents); K kernel frames.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soraax.conv import time_split_conv

# Presets are data, so a config names one and overrides fields: `VideoVAE(**{**VAE_TINY, "latent_channels": 4})`.
# Tiny: 0.52M params, sized for CPU runs on small clips (e.g. 64x96 moving shapes).
VAE_TINY = dict(widths=(8, 16, 32, 32), num_res_blocks=1, latent_channels=8,
                spatial_factor=8, temporal_factor=4, norm_groups=4)
# Big: 4x8x8 compression to 16 channels, the shape of the CogVideoX / Open-Sora / Wan class of video VAEs.
VAE_BIG = dict(widths=(128, 256, 512, 512), num_res_blocks=2, latent_channels=16,
               spatial_factor=8, temporal_factor=4, norm_groups=32)

# Wan 2.1 (github.com/Wan-Video/Wan2.1, diffusers' AutoencoderKLWan): base_dim 96 x dim_mult (1, 2, 4, 4),
# 2 res blocks, 16 latent channels, time compressed at the two lowest-resolution stages. Its latent
# mean/std are per channel and come from the checkpoint's config.json (soraax.wan.vae_weights).
VAE_WAN21 = dict(widths=(96, 192, 384, 384), num_res_blocks=2, latent_channels=16, spatial_factor=8,
                 temporal_factor=4, norm_groups=1, norm="rms", norm_eps=0.0, time_padding="zeros",
                 resample="separable", mid_attention=True, quant_convs=True, decoder_res_blocks=3,
                 temporal_stages=(False, True, True))

ACTIVATION_AXES = ("batch", "frames", "height", "width", "channels")
CONV_KERNEL_AXES = (None, None, None, "conv_in", "conv_out")

# Clamping logvar keeps exp(logvar) finite early in training, when the encoder's outputs are still large.
_LOGVAR_RANGE = (-30.0, 20.0)
# With shortcuts the VAE starts as average pooling; a posterior std of e^-3 keeps that start readable.
_SHORTCUT_LOGVAR = -6.0
_MIN_LATENT_STD = 1e-2
# Floor of the mean square in an RMS norm without epsilon: a zero vector stays zero (as F.normalize's does).
_MIN_MEAN_SQUARE = 1e-24
TIME_PADDINGS = ("replicate", "zeros")
RESAMPLES = ("conv3d", "separable")


# ---------------------------------------------------------------------------------------------------------
# Shapes


def _check_factor(name: str, factor: int) -> int:
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"{name} must be a power of two >= 1 (each down/upsampling stage halves/doubles); "
                         f"got {factor}")
    return int(math.log2(factor))


def latent_frames(num_frames: int, temporal_factor: int) -> int:
    """Pixel frames -> latent frames: `1 + ft*n` -> `1 + n` (the first frame is encoded alone)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        below = 1 + temporal_factor * ((num_frames - 1) // temporal_factor)
        options = [below, below + temporal_factor] if num_frames > 1 else [1]
        raise ValueError(
            f"{num_frames} frames cannot be encoded with temporal factor {temporal_factor}: the frame count "
            f"must be 1 + {temporal_factor}*n (1 is an image); nearest valid counts are {options}")
    return 1 + (num_frames - 1) // temporal_factor


def pixel_frames(num_latent_frames: int, temporal_factor: int) -> int:
    """Latent frames -> decoded pixel frames: `1 + n` -> `1 + ft*n`; the inverse of `latent_frames`."""
    if num_latent_frames < 1:
        raise ValueError(f"a latent clip needs at least 1 frame; got {num_latent_frames}")
    return 1 + (num_latent_frames - 1) * temporal_factor


def latent_shape(video_shape_THW: Sequence[int], *, spatial_factor: int,
                 temporal_factor: int) -> tuple[int, int, int]:
    """(T, H, W) of a clip -> (t, h, w) of its latent; a clear ValueError if the clip cannot be encoded."""
    if len(video_shape_THW) != 3:
        raise ValueError(f"video shape must be (T, H, W); got {tuple(video_shape_THW)}")
    num_frames, height, width = (int(s) for s in video_shape_THW)
    for axis, size in (("H", height), ("W", width)):
        if size < spatial_factor or size % spatial_factor:
            below = spatial_factor * (size // spatial_factor)
            options = sorted({s for s in (below, below + spatial_factor) if s > 0})
            raise ValueError(
                f"video (T, H, W) = {(num_frames, height, width)}: {axis}={size} is not a positive multiple of "
                f"the spatial factor {spatial_factor}; nearest valid sizes are {options}")
    t = latent_frames(num_frames, temporal_factor)
    return t, height // spatial_factor, width // spatial_factor


def _channel_vector(value: float | Sequence[float], channels: int, name: str) -> jnp.ndarray:
    """A scalar or per-channel field as a [1, 1, 1, 1, C] array that broadcasts against [B, t, h, w, C]."""
    vector = np.broadcast_to(np.asarray(value, np.float32), (channels,)) if np.ndim(value) == 0 \
        else np.asarray(value, np.float32)
    if vector.shape != (channels,):
        raise ValueError(f"{name} must be a scalar or {channels} values (one per latent channel); "
                         f"got {len(vector)} values")
    return jnp.asarray(vector).reshape(1, 1, 1, 1, channels)


# ---------------------------------------------------------------------------------------------------------
# Layers


def _constrain(x_BxTxHxWxC):
    return nn.with_logical_constraint(x_BxTxHxWxC, ACTIVATION_AXES)


def _is_streaming(module: nn.Module) -> bool:
    """True when the caller asked for a mutable `cache` (chunked decode); init never streams."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


def _holds_frame_0(module: nn.Module) -> bool:
    """Whether this call's input starts at latent frame 0: always, except for a streamed chunk after the
    first, which the module recognises by the mark it leaves in its `cache` on the first chunk."""
    continuing = _is_streaming(module) and module.has_variable("cache", "continuing")
    if _is_streaming(module):
        module.put_variable("cache", "continuing", jnp.ones((), jnp.bool_))
    return not continuing


class CausalConv3d(nn.Module):
    """Conv over (frames, height, width) that sees only the current and past frames.

    x: [B, T, H, W, Cin] -> [B, T', H', W', features]. Time is padded on the left with K-1 copies of the
    first frame (so a still image behaves like a still video; `time_padding="zeros"`: with zeros, as Wan
    does), or, when streaming, with the last K-1 frames of the previous chunk, which makes chunked
    application exact. Space is padded by K//2 on each side unless `spatial_padding` ((top, bottom),
    (left, right)) says otherwise.
    """
    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    strides: tuple[int, int, int] = (1, 1, 1)
    time_padding: str = "replicate"
    spatial_padding: tuple[tuple[int, int], tuple[int, int]] | None = None
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        kt, kh, kw = self.kernel_size
        streaming = _is_streaming(self) and kt > 1
        if streaming and self.strides[0] != 1:
            # A strided conv would also need its stride phase carried across chunks; only the decoder streams.
            raise ValueError(f"{self.name}: a conv with temporal stride {self.strides[0]} cannot run chunked; "
                             "stream the decoder only (decode_chunked)")
        if self.time_padding not in TIME_PADDINGS:
            raise ValueError(f"time_padding {self.time_padding!r} is not one of {TIME_PADDINGS}")
        if streaming and self.has_variable("cache", "past_frames"):
            past_BxKxHxWxC = self.get_variable("cache", "past_frames")
        elif self.time_padding == "zeros":
            past_BxKxHxWxC = jnp.zeros_like(x_BxTxHxWxC[:, :1]).repeat(kt - 1, axis=1)
        else:
            past_BxKxHxWxC = jnp.repeat(x_BxTxHxWxC[:, :1], kt - 1, axis=1)
        x_padded = jnp.concatenate([past_BxKxHxWxC.astype(x_BxTxHxWxC.dtype), x_BxTxHxWxC], axis=1)
        if streaming:
            self.put_variable("cache", "past_frames", x_padded[:, x_padded.shape[1] - (kt - 1):])
        conv = nn.Conv(
            self.features, self.kernel_size, strides=self.strides,
            padding=((0, 0), *(self.spatial_padding or ((kh // 2, kh // 2), (kw // 2, kw // 2)))),
            dtype=self.dtype, conv_general_dilated=time_split_conv,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, CONV_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(self.bias_init, ("conv_out",)))
        return _constrain(conv(x_padded))


class FrameNorm(nn.Module):
    """Normalisation that never pools over time: GroupNorm over each frame's (H, W, C) (`kind="group"`), or
    RMS over the channels of each position alone (`"rms"`, as in Wan's VAE; Wan's has `eps=0`, being
    F.normalize(x) * sqrt(C)).

    Group statistics over a frame subtract its mean, so on flat images (a uniform background) they wipe out
    absolute colour, which the network must then rebuild from padding effects; per-position RMS keeps the
    ratios between channels, i.e. colour, and learns far faster on such data.
    """
    groups: int
    dtype: Any = jnp.float32
    kind: str = "group"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        if self.kind == "rms":
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
                               (x_BxTxHxWxC.shape[-1],), jnp.float32)
            x = x_BxTxHxWxC.astype(jnp.float32)
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps,
                                              _MIN_MEAN_SQUARE))
            return (x * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)
        if self.kind != "group":
            raise ValueError(f"VAE norm {self.kind!r} is not one of 'group', 'rms'")
        return nn.GroupNorm(
            num_groups=self.groups, reduction_axes=(-3, -2, -1), dtype=self.dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
        )(x_BxTxHxWxC)


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs; a 1x1x1 conv matches channels on the skip."""
    features: int
    norm_groups: int
    dtype: Any = jnp.float32
    norm: str = "group"
    norm_eps: float = 1e-6
    time_padding: str = "replicate"

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        h = CausalConv3d(self.features, time_padding=self.time_padding, dtype=self.dtype)(
            nn.silu(FrameNorm(self.norm_groups, self.dtype, self.norm, self.norm_eps)(x_BxTxHxWxC)))
        h = CausalConv3d(self.features, time_padding=self.time_padding, dtype=self.dtype)(
            nn.silu(FrameNorm(self.norm_groups, self.dtype, self.norm, self.norm_eps)(h)))
        skip = x_BxTxHxWxC
        if skip.shape[-1] != self.features:
            skip = CausalConv3d(self.features, kernel_size=(1, 1, 1), dtype=self.dtype)(skip)
        return _constrain(skip + h)


class Downsample(nn.Module):
    """Halves H, W (if `spatial`) and frames `1 + 2n -> 1 + n` (if `temporal`) with one strided causal conv.

    With K=3 and stride 2, output frame j reads input frames 2j-2..2j: frame 0 reads only frame 0.
    """
    features: int
    spatial: bool
    temporal: bool
    shortcut: bool = False
    dtype: Any = jnp.float32
    time_padding: str = "replicate"

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        s, t = (2 if self.spatial else 1), (2 if self.temporal else 1)
        y = CausalConv3d(self.features, strides=(t, s, s), time_padding=self.time_padding,
                         dtype=self.dtype)(x_BxTxHxWxC)
        if self.shortcut:
            y = y + match_channels(causal_avg_pool(x_BxTxHxWxC, self.spatial, self.temporal), self.features)
        return y


class Upsample(nn.Module):
    """The mirror of `Downsample`: frames `1 + n -> 1 + 2n` (if `temporal`), H, W doubled (if `spatial`).

    Time: a causal conv makes two sub-frames per frame (depth-to-time), and the first frame keeps only its
    second sub-frame, so latent frame 0 decodes to exactly one frame. Space: nearest-neighbour then conv,
    which avoids the checkerboard of transposed convs.
    """
    features: int
    spatial: bool
    temporal: bool
    shortcut: bool = False
    dtype: Any = jnp.float32
    time_padding: str = "replicate"

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        x = skip = x_BxTxHxWxC
        if self.temporal:
            b, t, h, w, c = x.shape
            x = CausalConv3d(2 * c, time_padding=self.time_padding, dtype=self.dtype)(x)
            x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            skip = jnp.repeat(skip, 2, axis=1)
            if _holds_frame_0(self):  # only that chunk drops a sub-frame; later streamed chunks keep theirs
                x, skip = x[:, 1:], skip[:, 1:]
        if self.spatial:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            skip = jnp.repeat(jnp.repeat(skip, 2, axis=2), 2, axis=3)
        y = CausalConv3d(self.features, time_padding=self.time_padding, dtype=self.dtype)(x)
        if self.shortcut:
            y = y + match_channels(skip, self.features)
        return y


def _depth_to_time(x_BxTxHxWx2C):
    """[B, T, H, W, 2C] -> [B, 2T, H, W, C]: channels [0:C] become the earlier sub-frame, [C:2C] the later."""
    b, t, h, w, c2 = x_BxTxHxWx2C.shape
    c = c2 // 2
    return x_BxTxHxWx2C.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)


class SeparableDownsample(nn.Module):
    """Wan's resample down: a per-frame 3x3 conv of stride 2 (padded on the bottom and right only), then, if
    `temporal`, a (3, 1, 1) conv of stride 2 over time that frame 0 skips: frames `1 + 2n -> 1 + n`, output
    j >= 1 reading frames 2j-2..2j, output 0 being frame 0 itself.

    Wan computes this chunk by chunk (frame 0, then 4 frames at a time) with a cache; over the whole clip it
    is this. x: [B, T, H, W, C] -> [B, T', H/2, W/2, features].
    """
    features: int
    spatial: bool
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        x = x_BxTxHxWxC
        if self.spatial:
            x = CausalConv3d(self.features, kernel_size=(1, 3, 3), strides=(1, 2, 2),
                             spatial_padding=((0, 1), (0, 1)), dtype=self.dtype, name="spatial_conv")(x)
        if self.temporal:
            # The zero-padded causal conv's output 0 (which reads only padding and frame 0) is computed and
            # dropped, so that a 1-frame clip still calls (and so initialises) the time conv.
            y = CausalConv3d(self.features, kernel_size=(3, 1, 1), strides=(2, 1, 1), time_padding="zeros",
                             dtype=self.dtype, name="time_conv")(x)
            x = jnp.concatenate([x[:, :1], y[:, 1:]], axis=1)
        return _constrain(x)


class SeparableUpsample(nn.Module):
    """Wan's resample up: if `temporal`, a (3, 1, 1) causal conv to 2C channels that become two sub-frames
    per frame, for every frame but frame 0, which passes through alone and is not in the conv's view (the
    conv sees zeros before frame 1, as Wan's first decode chunk leaves its cache); then nearest 2x in space
    and a per-frame 3x3 conv. Frames `1 + n -> 1 + 2n`. x: [B, T, H, W, C] -> [B, T', 2H, 2W, features].
    """
    features: int
    spatial: bool
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        x = x_BxTxHxWxC
        if self.temporal:
            first_chunk = _holds_frame_0(self)
            # Frame 0 is replaced by zeros so the conv's view of frame 1 is (0, 0, frame 1) and its cache
            # after a 1-frame first chunk is all zeros, as Wan's.
            seen = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, 1:]], axis=1) if first_chunk else x
            y = _depth_to_time(CausalConv3d(2 * x.shape[-1], kernel_size=(3, 1, 1), time_padding="zeros",
                                            dtype=self.dtype, name="time_conv")(seen))
            x = jnp.concatenate([x[:, :1], y[:, 2:]], axis=1) if first_chunk else y
        if self.spatial:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        x = CausalConv3d(self.features, kernel_size=(1, 3, 3), dtype=self.dtype, name="spatial_conv")(x)
        return _constrain(x)


class FrameAttention(nn.Module):
    """Single-head self-attention among the positions of each frame (never across time, which keeps the
    VAE causal), pre-RMS-norm and residual: Wan's mid-block attention. x: [B, T, H, W, C] -> same."""
    norm_eps: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxHxWxC):
        b, t, h, w, c = x_BxTxHxWxC.shape
        dense = functools.partial(
            nn.Dense, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))
        normed = FrameNorm(1, self.dtype, "rms", self.norm_eps)(x_BxTxHxWxC)
        qkv_NxSx3C = dense(3 * c, name="to_qkv")(normed).reshape(b * t, h * w, 3 * c)
        q_NxSxC, k_NxSxC, v_NxSxC = jnp.split(qkv_NxSx3C, 3, axis=-1)
        logits_NxSxS = jnp.einsum("nqc,nkc->nqk", q_NxSxC, k_NxSxC).astype(jnp.float32) / np.sqrt(c)
        weights_NxSxS = jax.nn.softmax(logits_NxSxS, axis=-1).astype(v_NxSxC.dtype)
        out_NxSxC = jnp.einsum("nqk,nkc->nqc", weights_NxSxS, v_NxSxC)
        out = dense(c, name="proj")(out_NxSxC).reshape(b, t, h, w, c)
        return _constrain(x_BxTxHxWxC + out)


def causal_avg_pool(x_BxTxHxWxC, spatial: bool, temporal: bool):
    """The parameter-free path of a `Downsample`: 2x2 spatial means and, in time, frames `1 + 2n -> 1 + n`
    with frame j the mean of frames 2j-1 and 2j (frame 0 of itself), so it reads no future frame."""
    x = x_BxTxHxWxC
    if temporal:
        x = jnp.concatenate([x[:, :1], x], axis=1)
        b, t, h, w, c = x.shape
        x = x.reshape(b, t // 2, 2, h, w, c).mean(axis=2)
    if spatial:
        b, t, h, w, c = x.shape
        x = x.reshape(b, t, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5))
    return x


def pool_pixels(video_BxTxHxWx3, spatial_factor: int, temporal_factor: int):
    """The VAE's parameter-free encoder: causal means over spatial_factor^2 pixels x temporal_factor frames,
    [B, T, H, W, 3] -> [B, t, h, w, 3] (frame 0 alone, as for the learned path)."""
    x = video_BxTxHxWx3
    for _ in range(int(math.log2(spatial_factor))):
        x = causal_avg_pool(x, spatial=True, temporal=False)
    for _ in range(int(math.log2(temporal_factor))):
        x = causal_avg_pool(x, spatial=False, temporal=True)
    return x


def unpool_pixels(z_BxtxhxwxC, spatial_factor: int, temporal_factor: int, first_chunk: bool = True):
    """The inverse shape map of `pool_pixels` (nearest neighbour): latent frame 0 -> 1 frame, every later
    one -> temporal_factor frames. `first_chunk=False` is for a streamed chunk that does not hold frame 0."""
    x = jnp.repeat(jnp.repeat(z_BxtxhxwxC, spatial_factor, axis=2), spatial_factor, axis=3)
    x = jnp.repeat(x, temporal_factor, axis=1)
    return x[:, temporal_factor - 1:] if first_chunk else x


def pad_channels(x_BxTxHxWxC, channels: int):
    """Zero channels appended up to `channels` (the pixel shortcut fills the first 3 latent channels)."""
    missing = channels - x_BxTxHxWxC.shape[-1]
    if missing < 0:
        raise ValueError(f"the pixel shortcut needs at least {x_BxTxHxWxC.shape[-1]} latent channels, got {channels}")
    return jnp.pad(x_BxTxHxWxC, [(0, 0)] * (x_BxTxHxWxC.ndim - 1) + [(0, missing)])


def match_channels(x_BxTxHxWxC, channels: int):
    """C -> `channels` without parameters: means of groups of adjacent channels, or each channel repeated.
    `match_channels(match_channels(x, n), C)` puts every group mean back where the group was."""
    c = x_BxTxHxWxC.shape[-1]
    if c == channels:
        return x_BxTxHxWxC
    if c % channels == 0:
        return x_BxTxHxWxC.reshape(*x_BxTxHxWxC.shape[:-1], channels, c // channels).mean(axis=-1)
    if channels % c == 0:
        return jnp.repeat(x_BxTxHxWxC, channels // c, axis=-1)
    raise ValueError(f"a shortcut cannot map {c} channels to {channels}: one must divide the other")


def stage_plan(widths: Sequence[int], spatial_factor: int, temporal_factor: int,
                patch_size: int = 1, temporal_stages: Sequence[bool] | None = None) -> list[tuple[bool, bool]]:
    """(spatial, temporal) for each of the len(widths)-1 resolution changes; time is compressed at the
    high-resolution stages first, where halving the frames saves the most compute, unless `temporal_stages`
    (one bool a stage, Wan's `temperal_downsample`) says where. The input patch (space-to-depth) takes
    `patch_size` of the spatial factor before any stage."""
    patch_stages = _check_factor("patch_size", patch_size)
    spatial_stages = _check_factor("spatial_factor", spatial_factor) - patch_stages
    if spatial_stages < 0:
        raise ValueError(f"patch_size={patch_size} is larger than spatial_factor={spatial_factor}; the patch is "
                         "part of the spatial compression")
    temporal_stages_count = _check_factor("temporal_factor", temporal_factor)
    num_stages = max(spatial_stages, temporal_stages_count)
    if len(widths) != num_stages + 1:
        raise ValueError(
            f"widths {tuple(widths)} has {len(widths)} levels, but spatial_factor={spatial_factor} (patch_size="
            f"{patch_size}) and temporal_factor={temporal_factor} need {num_stages} down stages, i.e. "
            f"{num_stages + 1} widths")
    if temporal_stages is None:
        return [(i < spatial_stages, i < temporal_stages_count) for i in range(num_stages)]
    temporal = tuple(bool(t) for t in temporal_stages)
    if len(temporal) != num_stages or sum(temporal) != temporal_stages_count:
        raise ValueError(f"temporal_stages {temporal} must have one entry for each of the {num_stages} down "
                         f"stages, {temporal_stages_count} of them True for temporal_factor={temporal_factor}")
    return [(i < spatial_stages, temporal[i]) for i in range(num_stages)]


def space_to_depth(x_BxTxHxWxC, patch: int):
    """[B, T, H, W, C] -> [B, T, H/p, W/p, p*p*C]: each p x p pixel patch becomes one position's channels."""
    if patch == 1:
        return x_BxTxHxWxC
    b, t, h, w, c = x_BxTxHxWxC.shape
    x = x_BxTxHxWxC.reshape(b, t, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h // patch, w // patch, patch * patch * c)


def depth_to_space(x_BxTxhxwxPPC, patch: int):
    """The inverse of `space_to_depth`: [B, T, h, w, p*p*C] -> [B, T, h*p, w*p, C]."""
    if patch == 1:
        return x_BxTxhxwxPPC
    b, t, h, w, ppc = x_BxTxhxwxPPC.shape
    c = ppc // (patch * patch)
    x = x_BxTxhxwxPPC.reshape(b, t, h, w, patch, patch, c)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h * patch, w * patch, c)


class _Layout(nn.Module):
    """The fields Encoder and Decoder share, and the layers they build from them."""
    widths: tuple[int, ...]
    num_res_blocks: int
    spatial_factor: int
    temporal_factor: int
    norm_groups: int
    patch_size: int = 1
    shortcuts: bool = False
    norm: str = "group"
    norm_eps: float = 1e-6
    time_padding: str = "replicate"
    resample: str = "conv3d"
    mid_attention: bool = False
    quant_convs: bool = False
    decoder_res_blocks: int | None = None
    temporal_stages: tuple[bool, ...] | None = None
    dtype: Any = jnp.float32

    def _plan(self):
        return stage_plan(self.widths, self.spatial_factor, self.temporal_factor, self.patch_size,
                          self.temporal_stages)

    def _conv(self, features, **kwargs):
        return CausalConv3d(features, time_padding=self.time_padding, dtype=self.dtype, **kwargs)

    def _res(self, features):
        return ResBlock(features, self.norm_groups, self.dtype, self.norm, self.norm_eps, self.time_padding)

    def _norm(self):
        return FrameNorm(self.norm_groups, self.dtype, self.norm, self.norm_eps)

    def _mid(self, x):
        """The lowest-resolution block: a res block, or (with `mid_attention`) res, attention, res."""
        x = self._res(self.widths[-1])(x)
        if self.mid_attention:
            x = FrameAttention(self.norm_eps, self.dtype)(x)
            x = self._res(self.widths[-1])(x)
        return x


class Encoder(_Layout):
    """video [B, T, H, W, 3] -> (mean, logvar) [B, t, h, w, latent_channels], in the VAE's own latent space."""
    latent_channels: int = 0

    @nn.compact
    def __call__(self, video_BxTxHxWx3):
        plan = self._plan()
        x = space_to_depth(_constrain(video_BxTxHxWx3.astype(self.dtype)), self.patch_size)
        x = self._conv(self.widths[0])(x)
        for level, width in enumerate(self.widths):
            for _ in range(self.num_res_blocks):
                x = self._res(width)(x)
            if level < len(plan):
                spatial, temporal = plan[level]
                if self.resample == "separable":
                    x = SeparableDownsample(width, spatial, temporal, self.dtype)(x)
                else:
                    x = Downsample(width, spatial, temporal, self.shortcuts, self.dtype, self.time_padding)(x)
        x = self._mid(x)
        h = nn.silu(self._norm()(x))
        head = {}
        if self.shortcuts:  # start as the average-pool autoencoder, with a small posterior noise
            head = dict(kernel_init=nn.initializers.zeros_init(),
                        bias_init=lambda key, shape, dtype=jnp.float32: jnp.concatenate(
                            [jnp.zeros((shape[0] // 2,), dtype), jnp.full((shape[0] // 2,), _SHORTCUT_LOGVAR, dtype)]))
        moments = self._conv(2 * self.latent_channels, **head)(h)
        if self.quant_convs:
            moments = self._conv(2 * self.latent_channels, kernel_size=(1, 1, 1), name="quant_conv")(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        if self.shortcuts:
            pooled = pool_pixels(video_BxTxHxWx3.astype(jnp.float32), self.spatial_factor, self.temporal_factor)
            mean = mean + pad_channels(pooled, self.latent_channels)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)


class Decoder(_Layout):
    """z [B, t, h, w, latent_channels] (VAE's own space) -> video [B, T, H, W, 3]; mirrors `Encoder`.

    Separable resampling halves the channels in each upsample, as Wan's does, so a level's first res block
    starts from half the width of the level below; `decoder_res_blocks` (default `num_res_blocks`) is the
    res blocks per level.
    """

    @nn.compact
    def __call__(self, z_BxtxhxwxC):
        plan = self._plan()
        z = _constrain(z_BxtxhxwxC.astype(self.dtype))
        if self.quant_convs:
            z = self._conv(z.shape[-1], kernel_size=(1, 1, 1), name="post_quant_conv")(z)
        x = self._conv(self.widths[-1])(z)
        if self.shortcuts:
            x = x + match_channels(z, self.widths[-1])
        x = self._mid(x)
        res_blocks = self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks
        for level in reversed(range(len(self.widths))):
            for _ in range(res_blocks):
                x = self._res(self.widths[level])(x)
            if level > 0:
                spatial, temporal = plan[level - 1]
                if self.resample == "separable":
                    x = SeparableUpsample(self.widths[level] // 2, spatial, temporal, self.dtype)(x)
                else:
                    x = Upsample(self.widths[level - 1], spatial, temporal, self.shortcuts, self.dtype,
                                 self.time_padding)(x)
        x = nn.silu(self._norm()(x))
        out = {"kernel_init": nn.initializers.zeros_init()} if self.shortcuts else {}
        x = self._conv(3 * self.patch_size ** 2, **out)(x).astype(jnp.float32)
        video = depth_to_space(x, self.patch_size)
        if self.shortcuts:
            # Only the chunk holding frame 0 decodes latent frame 0 to a single frame (as in Upsample).
            video = video + unpool_pixels(z_BxtxhxwxC[..., :3].astype(jnp.float32), self.spatial_factor,
                                          self.temporal_factor, first_chunk=_holds_frame_0(self))
        return video


# ---------------------------------------------------------------------------------------------------------
# The VAE


class VideoVAE(nn.Module):
    """Causal 3D conv VAE. video [B, T, H, W, 3] in [-1, 1] <-> latent [B, t, h, w, latent_channels].

    t = 1 + (T-1)/temporal_factor, h = H/spatial_factor, w = W/spatial_factor; any T, H, W satisfying these
    (a 1-frame clip is an image). `widths` are the channels per resolution level, one level more than the
    number of halvings, log2(max(spatial_factor, temporal_factor)). `latent_mean`/`latent_std` (scalar or
    per channel) map the VAE's latents to the diffusion model's; see the module docstring. The fields from
    `norm_eps` to `temporal_stages` select Wan 2.1's layout (`VAE_WAN21`); their defaults are soraax's own.
    """
    widths: tuple[int, ...] = VAE_TINY["widths"]
    num_res_blocks: int = VAE_TINY["num_res_blocks"]
    latent_channels: int = VAE_TINY["latent_channels"]
    spatial_factor: int = VAE_TINY["spatial_factor"]
    temporal_factor: int = VAE_TINY["temporal_factor"]
    norm_groups: int = VAE_TINY["norm_groups"]
    patch_size: int = 1
    shortcuts: bool = False
    norm: str = "group"
    norm_eps: float = 1e-6  # of the "rms" norm; Wan's is 0
    time_padding: str = "replicate"  # what pads frame 0's past: copies of it, or "zeros" (Wan)
    resample: str = "conv3d"  # one strided 3D conv, or "separable": 2D conv + time conv (Wan)
    mid_attention: bool = False  # per-frame attention between two res blocks at the lowest resolution (Wan)
    quant_convs: bool = False  # 1x1x1 convs after the encoder and before the decoder (Wan)
    decoder_res_blocks: int | None = None  # res blocks per decoder level; None: num_res_blocks (Wan: +1)
    temporal_stages: tuple[bool, ...] | None = None  # which down stages halve time; None: the first ones
    latent_mean: float | tuple[float, ...] = 0.0
    latent_std: float | tuple[float, ...] = 1.0
    dtype: Any = jnp.float32

    def setup(self):
        stage_plan(self.widths, self.spatial_factor, self.temporal_factor, self.patch_size, self.temporal_stages)
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every width; widths {bad} of "
                             f"{tuple(self.widths)} are not multiples")
        if self.resample not in RESAMPLES:
            raise ValueError(f"VAE resample {self.resample!r} is not one of {RESAMPLES}")
        if self.time_padding not in TIME_PADDINGS:
            raise ValueError(f"VAE time_padding {self.time_padding!r} is not one of {TIME_PADDINGS}")
        if self.shortcuts and self.resample != "conv3d":
            raise ValueError("shortcuts (the average-pool paths) exist only with resample='conv3d'")
        if self.resample == "separable" and any(w % 2 for w in self.widths[1:]):
            raise ValueError(f"separable resampling halves the channels of each upsample: widths "
                             f"{tuple(self.widths)} must be even after the first")
        common = dict(widths=tuple(self.widths), num_res_blocks=self.num_res_blocks,
                      spatial_factor=self.spatial_factor, temporal_factor=self.temporal_factor,
                      norm_groups=self.norm_groups, patch_size=self.patch_size, shortcuts=self.shortcuts,
                      norm=self.norm, norm_eps=self.norm_eps, time_padding=self.time_padding,
                      resample=self.resample, mid_attention=self.mid_attention, quant_convs=self.quant_convs,
                      decoder_res_blocks=self.decoder_res_blocks,
                      temporal_stages=None if self.temporal_stages is None else tuple(self.temporal_stages),
                      dtype=self.dtype)
        self._shift_scale()
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(**common)

    def _shift_scale(self):
        return (_channel_vector(self.latent_mean, self.latent_channels, "latent_mean"),
                _channel_vector(self.latent_std, self.latent_channels, "latent_std"))

    def _check_video(self, video):
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"video must be [B, T, H, W, 3] (RGB in [-1, 1]); got shape {tuple(video.shape)}")
        latent_shape(video.shape[1:4], spatial_factor=self.spatial_factor, temporal_factor=self.temporal_factor)

    def _check_latent(self, z):
        if z.ndim != 5 or z.shape[-1] != self.latent_channels or z.shape[1] < 1:
            raise ValueError(f"latent must be [B, t>=1, h, w, {self.latent_channels}]; got shape {tuple(z.shape)}")

    def encode(self, video_BxTxHxWx3):
        """-> (mean, logvar) [B, t, h, w, C] of the posterior, in diffusion space (scaled and shifted)."""
        self._check_video(video_BxTxHxWx3)
        mean, logvar = self.encoder(video_BxTxHxWx3)
        shift, scale = self._shift_scale()
        return (mean - shift) / scale, logvar - 2.0 * jnp.log(scale)

    def decode(self, z_BxtxhxwxC):
        """Diffusion-space latent [B, t, h, w, C] -> video [B, 1 + ft*(t-1), H, W, 3], unclipped."""
        self._check_latent(z_BxtxhxwxC)
        shift, scale = self._shift_scale()
        return self.decoder(z_BxtxhxwxC * scale + shift)

    def __call__(self, video_BxTxHxWx3, sample_key: jax.Array | None = None):
        """-> (recon [B, T, H, W, 3], mean, logvar): the training path, in the VAE's own latent space.

        z = mean + exp(logvar/2) * eps with a key, z = mean without one.
        """
        self._check_video(video_BxTxHxWx3)
        mean, logvar = self.encoder(video_BxTxHxWx3)
        z = mean
        if sample_key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_key, mean.shape, mean.dtype)
        return self.decoder(z), mean, logvar


@functools.partial(jax.jit, static_argnums=0)
def encode_mean(vae: VideoVAE, vae_params, video_BxTxHxWx3):
    """The posterior mean [B, t, h, w, C] in diffusion space: how the data pipeline, the capabilities and
    eval encode clips (sampling the posterior is for the VAE's own training)."""
    mean, _ = vae.apply({"params": vae_params}, video_BxTxHxWx3, method=VideoVAE.encode)
    return mean


# ---------------------------------------------------------------------------------------------------------
# Chunked decode


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(vae: VideoVAE, variables, cache, z_chunk):
    if cache is not None:
        variables = {**variables, "cache": cache}
    video, state = vae.apply(variables, z_chunk, method=VideoVAE.decode, mutable=["cache"])
    return video, state["cache"]


def iter_decode_chunks(vae: VideoVAE, params, z_BxtxhxwxC, chunk_latent_frames: int) -> Iterator[jax.Array]:
    """Decodes `chunk_latent_frames` latent frames at a time, yielding pixel chunks in order.

    The first chunk yields `1 + ft*(n-1)` frames, later ones `ft*n`; concatenated along time they equal
    `vae.decode` of the whole clip. Memory is that of one chunk plus each causal conv's K-1 cached frames,
    so a writer can stream frames to disk while the next chunk decodes. `params` is what `vae.init` returned.
    Each distinct chunk length compiles once (the first chunk, later chunks, a shorter last chunk).
    """
    if chunk_latent_frames < 1:
        raise ValueError(f"chunk_latent_frames must be >= 1; got {chunk_latent_frames}")
    cache = None
    for start in range(0, z_BxtxhxwxC.shape[1], chunk_latent_frames):
        video_chunk, cache = _decode_step(vae, params, cache, z_BxtxhxwxC[:, start:start + chunk_latent_frames])
        yield video_chunk


def decode_chunked(vae: VideoVAE, params, z_BxtxhxwxC, chunk_latent_frames: int) -> jax.Array:
    """`vae.decode(z)` computed `chunk_latent_frames` latent frames at a time (exact; see iter_decode_chunks)."""
    return jnp.concatenate(list(iter_decode_chunks(vae, params, z_BxtxhxwxC, chunk_latent_frames)), axis=1)


# ---------------------------------------------------------------------------------------------------------
# Loss and metrics


def gaussian_kl(mean, logvar):
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def psnr(video, recon):
    """Mean over the batch of each clip's PSNR in dB, for videos in [-1, 1] (peak-to-peak 2).

    `recon` is clipped to [-1, 1] first: that is what gets written to disk.
    """
    err = jnp.clip(recon, -1.0, 1.0) - video
    mse_B = jnp.mean(jnp.square(err).reshape(err.shape[0], -1), axis=1)
    return jnp.mean(10.0 * jnp.log10(4.0 / mse_B))


def vae_loss(video, recon, mean, logvar, *, kl_weight: float,
             extra_losses: Sequence[Callable] | Mapping[str, Callable] = ()):
    """-> (loss, metrics): L1 + L2 reconstruction + kl_weight * KL, plus each extra loss.

    Every term is a mean per element (pixel values for reconstruction, latent values for the KL), so
    kl_weight does not change with clip size. LDM's weight of 1e-6 on per-sample sums is 1e-6 / 48 ~ 2e-8
    here for 4x8x8 compression to 16 channels (48 pixel values per latent value). `extra_losses` take
    (video, recon) -> scalar and carry their own weights (the hook for perceptual or adversarial terms);
    a mapping names them in the metrics, a sequence gets `extra_0`, `extra_1`, ...
    """
    err = recon.astype(jnp.float32) - video.astype(jnp.float32)
    metrics = {
        "l1": jnp.mean(jnp.abs(err)),
        "l2": jnp.mean(jnp.square(err)),
        "kl": jnp.mean(gaussian_kl(mean, logvar)),
    }
    loss = metrics["l1"] + metrics["l2"] + kl_weight * metrics["kl"]
    named = extra_losses.items() if isinstance(extra_losses, Mapping) else \
        ((f"extra_{i}", fn) for i, fn in enumerate(extra_losses))
    for name, fn in named:
        metrics[name] = fn(video, recon)
        loss = loss + metrics[name]
    metrics["psnr"] = psnr(video, recon)
    metrics["loss"] = loss
    return loss, metrics


def latent_channel_stats(latents: Iterable[Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) over latents [..., C] of any shapes (e.g. `encode` means of a data sample),
    as tuples of floats ready to pass as `latent_mean` / `latent_std`. Encode with the default 0/1 fields."""
    count, total, total_sq = 0, 0.0, 0.0
    for latent in latents:
        flat = np.asarray(latent, np.float64).reshape(-1, np.shape(latent)[-1])
        count += flat.shape[0]
        total = total + flat.sum(0)
        total_sq = total_sq + np.square(flat).sum(0)
    if count == 0:
        raise ValueError("latent_channel_stats needs at least one latent")
    mean = total / count
    # A channel the VAE has not started to use (a shortcut VAE's learned channels begin at exactly 0) has
    # no spread; a floor keeps it near 0 instead of dividing by 0.
    std = np.maximum(np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0)), _MIN_LATENT_STD)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)

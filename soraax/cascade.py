"""Super-resolution cascade (Imagen Video, Ho et al. 2022; cascaded diffusion, CDM, Ho et al. 2021).

A base DiT samples a small clip; each super-resolution (SR) stage then samples a bigger one - `sr.spatial_factor`
times the height and width, and with `sr.temporal_factor` > 1 that many times the frame rate - while it also
sees the previous stage's latent, upsampled onto its own patch grid and concatenated to its noisy tokens
(soraax/dit.py, `lowres_dim`). An SR stage is the same DiT trained with task "sr" (configs/sr_tiny.py) and the
same train CLI; `python -m soraax.sample --cascade BASE_DIR,SR_DIR[,SR2_DIR...]` runs the stages in turn and
decodes once, at the end.

Every stage works in the latent space of ONE frozen VAE, the base run's (an SR config names it in
`vae.checkpoint`), so upsampling is in latents and needs no decode between stages:
  * in space, latent cell j of the low-res grid becomes `sf` cells (nearest), or each high-res cell is
    interpolated linearly between the two nearest low-res cell centres (`trilinear`: per axis, half-pixel
    centres, edges clamped);
  * in time, the causal VAE's arithmetic (ft = vae.temporal_factor): 1 + n latent frames are 1 + ft*n pixel
    frames, so the clip at `tf` times the frame rate has 1 + tf*ft*n pixel frames, 1 + tf*n latent frames.
    High-res latent frame 0 is low-res latent 0 (frame 0, an image, alone in both); high-res latent k >= 1
    lies inside low-res latent ceil(k / tf) (nearest), whose centre is at high-res latent tf*(j-1) + (tf+1)/2
    (linear interpolates between those centres).
Training pairs are built the same way from one crop: the high-res clip, and the low-res clip = the same crop
averaged over `sf x sf` pixels and keeping every `tf`-th frame (a box filter: the antialiased downscale),
each encoded by the frozen VAE, the low-res latent then upsampled as above (soraax/data/pipeline.py,
`sr_batches`). The conditioning tokens travel with the tokens they condition, so they pack exactly.

Noise augmentation. The low-res conditioning is itself noised along the flow path,
z_aug = (1 - s) z + s eps, to a level s drawn per clip uniformly in [0, sr.max_aug] in training, and s is
given to the DiT (an embedding added to adaLN); sampling uses one fixed small `sr.sample_aug`. In training
the low-res latent is an exact encoding of real video; at sampling it is the base model's output, with the
base model's artefacts. Noising the conditioning makes those differences indistinguishable from noise the SR
stage has learned to see through, and the level tells it how much to trust the conditioning: CDM found this
the single most important ingredient of a cascade, and Imagen Video uses it at every SR stage.

Dimension key: B batch rows, S packed tokens, M segments a row, N tokens of one clip, Q patch dim of the
conditioning tokens; t/h/w latent frames/height/width, C latent channels; T/H/W pixel frames/height/width.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soraax import diffusion, patches

if TYPE_CHECKING:  # sampling imports the trainer, whose input pipeline imports this module
    from soraax.sampling import Run

UPSAMPLE_METHODS = ("nearest", "trilinear")
# The VAE keys that fix its latent space: an SR stage must have been trained on its base's VAE.
VAE_ARCHITECTURE = ("widths", "num_res_blocks", "latent_channels", "spatial_factor", "temporal_factor",
                    "norm_groups", "patch_size", "shortcuts", "norm")


def factors(cfg) -> tuple[int, int]:
    """(spatial, temporal) factor of an SR config's stage."""
    return int(cfg.sr.spatial_factor), int(cfg.sr.temporal_factor)


# ------------------------------------------------------------------------------------------ upsampling


def highres_latent_frames(lowres_frames: int, temporal_factor: int) -> int:
    """Latent frames 1 + n -> 1 + tf*n: the causal VAE's first latent is one frame, every later one ft frames."""
    return 1 + temporal_factor * (int(lowres_frames) - 1)


def _interpolation(positions_in: np.ndarray, size_out: int) -> np.ndarray:
    """[out, in] weights interpolating linearly between inputs centred at `positions_in` (high-res units),
    clamped at both ends."""
    eye = np.eye(len(positions_in), dtype=np.float64)
    out = np.arange(size_out, dtype=np.float64)
    return np.stack([np.interp(out, positions_in, eye[j]) for j in range(len(positions_in))], axis=1)


def space_weights(size_in: int, factor: int, method: str) -> np.ndarray:
    """float32 [size_in * factor, size_in]: spatial upsampling of latent cells by `factor`."""
    _check_method(method)
    out = np.arange(size_in * factor)
    if method == "nearest":
        return np.eye(size_in, dtype=np.float32)[out // factor]
    centres = (np.arange(size_in) + 0.5) * factor - 0.5  # half-pixel centres, as image resizers use
    return _interpolation(centres, size_in * factor).astype(np.float32)


def time_weights(frames_in: int, factor: int, method: str) -> np.ndarray:
    """float32 [1 + factor*(frames_in - 1), frames_in]: latent frames of a clip at `factor` times the frame
    rate from those of the clip (the causal VAE's arithmetic, module docstring)."""
    _check_method(method)
    frames_out = highres_latent_frames(frames_in, factor)
    out = np.arange(frames_out)
    if method == "nearest":
        return np.eye(frames_in, dtype=np.float32)[(out + factor - 1) // factor]
    centres = np.concatenate([[0.0], factor * np.arange(frames_in - 1) + (factor + 1) / 2])
    return _interpolation(centres, frames_out).astype(np.float32)


def _check_method(method: str):
    if method not in UPSAMPLE_METHODS:
        raise ValueError(f"sr.upsample={method!r} is not one of {UPSAMPLE_METHODS}")


def upsample_latent(latent_thwC, spatial_factor: int, temporal_factor: int, method: str) -> np.ndarray:
    """float32 latent [t, h, w, C] -> [1 + tf*(t-1), sf*h, sf*w, C], separable per axis."""
    latent = np.asarray(latent_thwC, np.float32)
    t, h, w, _ = latent.shape
    return np.einsum("Tt,Hh,Ww,thwc->THWc", time_weights(t, temporal_factor, method),
                     space_weights(h, spatial_factor, method), space_weights(w, spatial_factor, method), latent,
                     optimize=True).astype(np.float32)


def lowres_tokens(cfg, lowres_latent_thwC) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(conditioning tokens [N, Q], patch grid) of an SR config's stage for the previous stage's latent: the
    latent upsampled by the config's factors and cut into the stage's own patches, in token order."""
    spatial, temporal = factors(cfg)
    up = upsample_latent(lowres_latent_thwC, spatial, temporal, cfg.sr.upsample)
    patch_size = tuple(int(p) for p in cfg.model.patch_size)
    grid = patches.grid_shape(up.shape, patch_size)  # ValueError naming the shapes if they do not tile
    return patches.patchify(up, patch_size)[0], grid


def downscale_video(video_THWC: np.ndarray, spatial_factor: int, temporal_factor: int) -> np.ndarray:
    """float video [1 + tf*m, H, W, 3] -> the low-res clip [1 + m, H/sf, W/sf, 3]: every tf-th frame, the
    mean of each sf x sf block of pixels (a box filter: antialiased, and exact at any integer factor)."""
    t, h, w, c = video_THWC.shape
    if (t - 1) % temporal_factor or h % spatial_factor or w % spatial_factor:
        raise ValueError(f"a {t}x{h}x{w} clip does not downscale by {spatial_factor} in space and "
                         f"{temporal_factor} in time: frames must be 1 + {temporal_factor}*m, height and width "
                         f"multiples of {spatial_factor}")
    frames = np.asarray(video_THWC, np.float32)[::temporal_factor]
    sf = spatial_factor
    return frames.reshape(len(frames), h // sf, sf, w // sf, sf, c).mean(axis=(2, 4))


def sr_budget(cfg) -> dict:
    """`pipeline.fit_to_budget`'s sizing arguments for an SR stage's training clips.

    A high-res clip must be whole patches of the stage AND downscale to whole VAE latents, so its latent
    height is a multiple of lcm(patch, sf): `fit_to_budget` sizes it in those units, with the budget divided
    by the tokens a unit holds. In time it sizes the LOW-RES clip (temporal factor ft*tf: its 1 + n latent
    frames are the high-res clip's 1 + tf*n, fewer than tf*(1 + n)), with the budget divided by tf, so the
    high-res clip stays within data.token_budget.
    """
    spatial, temporal = factors(cfg)
    pt, ph, pw = (int(p) for p in cfg.model.patch_size)
    unit_h, unit_w = math.lcm(ph, spatial), math.lcm(pw, spatial)
    tokens_a_unit = (unit_h // ph) * (unit_w // pw)
    return dict(token_budget=int(cfg.data.token_budget) // (tokens_a_unit * temporal),
                max_frames=int(cfg.data.max_frames), spatial_factor=int(cfg.vae.spatial_factor),
                temporal_factor=int(cfg.vae.temporal_factor) * temporal, patch_size=(pt, unit_h, unit_w))


# ---------------------------------------------------------------------------------- noise augmentation


def augment_per_segment(key, lowres_BxSxQ, segment_ids_BxS, *, max_segments: int, max_aug: float):
    """(noised conditioning [B, S, Q], level per token [B, S]) for training: one level s ~ U[0, max_aug] per
    clip, gathered per token (0 on padding), and the clip's tokens moved along the flow path to s."""
    k_level, k_eps = jax.random.split(key)
    s_BxM = jax.random.uniform(k_level, (segment_ids_BxS.shape[0], max_segments + 1), jnp.float32, 0.0, max_aug)
    s_BxS = jnp.take_along_axis(s_BxM, segment_ids_BxS, axis=1, mode="clip")
    s_BxS = jnp.where(segment_ids_BxS > 0, s_BxS, 0.0)
    eps = jax.random.normal(k_eps, lowres_BxSxQ.shape, jnp.float32)
    return diffusion.flow_interpolate(lowres_BxSxQ.astype(jnp.float32), eps, s_BxS), s_BxS


def augment(tokens_NxQ: np.ndarray, key: jax.Array, level: float) -> np.ndarray:
    """One clip's conditioning tokens noised to the fixed sampling `level` with the clip's own noise."""
    eps = np.asarray(jax.random.normal(key, np.shape(tokens_NxQ), jnp.float32))
    return ((1.0 - level) * np.asarray(tokens_NxQ, np.float32) + level * eps).astype(np.float32)


# ------------------------------------------------------------------------------------------- stages


def check_stages(cfgs: Sequence, names: Sequence[str]) -> None:
    """ValueError unless `cfgs` are a base DiT run and then SR runs, all in the latent space of one VAE."""
    if len(cfgs) < 2:
        raise ValueError(f"--cascade needs a base run and at least one SR run (BASE_DIR,SR_DIR); got {list(names)}")
    base, name = cfgs[0], names[0]
    if base.task != "dit":
        raise ValueError(f"--cascade: {name} is a {base.task!r} run; the first stage must be a DiT run (task 'dit')")
    for cfg, sr_name in zip(cfgs[1:], names[1:]):
        if cfg.task != "sr":
            raise ValueError(f"--cascade: {sr_name} is a {cfg.task!r} run; every stage after the first must be "
                             f"a super-resolution run (task 'sr', e.g. configs/sr_tiny.py)")
        differ = [k for k in VAE_ARCHITECTURE if base.vae.get(k) != cfg.vae.get(k)]
        if differ:
            raise ValueError(f"--cascade: {sr_name} was trained on another VAE than {name} (vae.{differ[0]}: "
                             f"{cfg.vae.get(differ[0])!r} vs {base.vae.get(differ[0])!r}); an SR stage must "
                             f"name its base's VAE in config.vae.checkpoint")


def _output_units(cfgs: Sequence) -> tuple[int, int]:
    """Pixels the output's height and width must be multiples of: every stage's patch in pixels, times the
    spatial factors of the stages after it."""
    from soraax import sampling  # see the TYPE_CHECKING import above
    units, later = [1, 1], 1
    for i in reversed(range(len(cfgs))):
        units = [math.lcm(u, later * p) for u, p in zip(units, sampling.pixel_units(cfgs[i]))]
        later *= factors(cfgs[i])[0] if i else 1
    return units[0], units[1]


def _check_side(flag: str, value: int, unit: int) -> None:
    if value < unit or value % unit:
        below = unit * (value // unit)
        raise ValueError(f"{flag} {value} with --cascade must be a positive multiple of {unit} (every stage's "
                         f"patch in pixels, times the SR factors after it); nearest valid: "
                         f"{' or '.join(str(v) for v in (below, below + unit) if v > 0)}")


def _base_frames(cfgs: Sequence, names: Sequence[str], frames: int) -> int:
    """The base stage's frames for an output of `frames`; ValueError naming --frames and the nearest valid."""
    from soraax import sampling  # see the TYPE_CHECKING import above
    rate = math.prod(factors(cfg)[1] for cfg in cfgs[1:])
    first, step = sampling._frame_step(cfgs[0])  # the base's valid clip lengths: first + step*n
    n, left = divmod(frames - 1 - rate * (first - 1), rate * step)
    if left or n < 0:
        options = sorted({1 + rate * (first - 1 + step * max(k, 0)) for k in (n, n + 1)})
        raise ValueError(f"--frames {frames} with --cascade: the base run {names[0]} makes {first} + {step}*n "
                         f"frames and the SR stages multiply the frame rate by {rate} (sr.temporal_factor), so "
                         f"the output has 1 + {rate}*(base frames - 1); nearest valid: "
                         f"{' or '.join(map(str, options))}")
    return first + step * n


def stage_sizes(cfgs: Sequence, names: Sequence[str], *, frames: int, height: int | None = None,
                width: int | None = None, aspect=None) -> list[tuple[int, int, int]]:
    """(frames, height, width) of each stage for an output of `frames` x `height` x `width` (the last stage's).

    A side not given follows the base run's default (its token-budget frame near `aspect`) times the SR
    factors. Every stage's size is checked against its own run (whole patches, within a packed row); a
    ValueError names the flag, or the stage.
    """
    from soraax import sampling  # see the TYPE_CHECKING import above
    aspect = sampling.DEFAULT_ASPECT if aspect is None else aspect
    scale = math.prod(factors(cfg)[0] for cfg in cfgs[1:])
    base_frames = _base_frames(cfgs, names, frames)
    for flag, value, unit in zip(("--height", "--width"), (height, width), _output_units(cfgs)):
        if value is not None:
            _check_side(flag, value, unit)
    base_h = None if height is None else height // scale
    base_w = None if width is None else width // scale
    sizes = [(base_frames, *sampling.frame_size(cfgs[0], base_frames, aspect, base_h, base_w))]
    for cfg in cfgs[1:]:
        spatial, temporal = factors(cfg)
        f, h, w = sizes[-1]
        sizes.append((1 + temporal * (f - 1), spatial * h, spatial * w))
    for cfg, name, (f, h, w) in zip(cfgs, names, sizes):
        try:
            sampling.check_size(cfg, frames=f, height=h, width=w)
        except ValueError as error:
            raise ValueError(f"--cascade stage {name} at {f}x{h}x{w}: {error}") from error
    return sizes


# --------------------------------------------------------------------------------------------- sampling


def super_resolve(run: Run, latents: Sequence[np.ndarray], prompts: Sequence[str], keys: Sequence[jax.Array], *,
                  steps: int, guidance: float, progress: bool = False) -> list[np.ndarray]:
    """One SR stage: the previous stage's latents [t, h, w, C] -> this stage's [1 + tf*(t-1), sf*h, sf*w, C].

    Each clip's conditioning is its latent upsampled onto the stage's patch grid and noised to the fixed
    `sr.sample_aug` with noise from its key (split from the key of its own sampling noise); text guidance
    sees the same conditioning in both passes. The clips are packed and sampled as text->video is.
    """
    from soraax import sampling  # see the TYPE_CHECKING import above
    if run.models.dit.lowres_dim == 0:
        raise ValueError(f"{run.workdir} is not a super-resolution run (task {run.cfg.task!r})")
    level = float(run.cfg.sr.sample_aug)
    clips = []
    for latent, prompt, key in zip(latents, prompts, keys, strict=True):
        tokens_NxQ, grid = lowres_tokens(run.cfg, latent)
        k_noise, k_aug = jax.random.split(key)
        clips.append(sampling.Clip(prompt, grid, k_noise, lowres_tokens=augment(tokens_NxQ, k_aug, level),
                                   lowres_aug=level))
    return sampling.sample_latents(run, clips, steps=steps, guidance=guidance, progress=progress)


def check_runs(runs: Sequence[Run]) -> None:
    """ValueError unless the loaded runs are a base and SR stages on one VAE (same latent statistics too)."""
    check_stages([run.cfg for run in runs], [run.workdir for run in runs])
    base = runs[0].models.vae
    for run in runs[1:]:
        vae = run.models.vae
        if (tuple(np.ravel(vae.latent_mean)) != tuple(np.ravel(base.latent_mean))
                or tuple(np.ravel(vae.latent_std)) != tuple(np.ravel(base.latent_std))):
            raise ValueError(f"--cascade: {run.workdir}'s VAE has other latent statistics than {runs[0].workdir}'s "
                             f"(another VAE run); an SR stage must name its base's VAE in config.vae.checkpoint")


def generate(runs: Sequence[Run], prompts: Sequence[str], *, frames: int, height: int | None = None,
             width: int | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
             progress: bool = False) -> np.ndarray:
    """uint8 [N, T, H, W, 3]: the base run samples each prompt at its size, every SR run then at its higher
    size, and the last stage's latents are decoded once. The output size is `frames` x `height` x `width`
    (`stage_sizes`). Clip i depends on (seed, i) alone: the base draws from `sampling.clip_key(seed, i)`,
    stage s from that key folded with s. `steps`/`guidance` default to each run's own config."""
    from soraax import sampling  # see the TYPE_CHECKING import above
    check_runs(runs)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    sizes = stage_sizes([run.cfg for run in runs], [run.workdir for run in runs], frames=frames, height=height,
                        width=width)

    def options(run):
        d = run.cfg.diffusion
        return dict(steps=int(d.sample_steps if steps is None else steps),
                    guidance=float(d.guidance if guidance is None else guidance), progress=progress)

    base = runs[0]
    f, h, w = sizes[0]
    grid = sampling.check_size(base.cfg, frames=f, height=h, width=w)
    keys = [sampling.clip_key(seed, i) for i in range(len(prompts))]
    latents = sampling.sample_latents(base, [sampling.Clip(p, grid, k) for p, k in zip(prompts, keys)],
                                      **options(base))
    for stage, run in enumerate(runs[1:], start=1):
        latents = super_resolve(run, latents, prompts, [jax.random.fold_in(k, stage) for k in keys], **options(run))
    return np.stack(sampling.decode(runs[-1], latents))

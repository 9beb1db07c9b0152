"""Sampling a trained run: prompts -> packed noise on the patch grid -> guided flow ODE -> VAE -> uint8 clips.

Generation packs the way training does: several clips share a row of `seq_len` tokens, their captions share
a row of `text_len` text tokens, and segment ids keep them apart, so each clip gets what it would get alone
(DESIGN.md: packing is exact). Each clip's noise comes from its own key, so a clip does not depend on which
row, neighbours or batch it lands in: `generate(prompts, seed=s)[i]` is a function of (s, i, prompt i).

Classifier-free guidance runs the conditional and the unconditional (empty caption) passes as ONE DiT call
on the rows stacked twice, and the whole Euler loop is one jitted program per (rows, steps, passes) shape.
Each clip follows the time grid it was trained on: its timesteps are shifted by its own token count.

`sample_latents` works on `Clip`s at the latent level, and a clip may carry clean tokens held fixed under a
`cond_mask` (at t = 0, as in training): the mechanism image->video, extension, connecting clips and loops
use (soraax/capabilities.py), and an `init_tokens` latent to start from at a `strength` (SDEdit). With an
`image_guidance` scale, guidance has two conditions (InstructPix2Pix): the text, and the held tokens; its
three passes (neither, held tokens only, both) are again one DiT call on the rows stacked three times.
A super-resolution run's clips also carry `lowres_tokens` (soraax/cascade.py), packed alongside and seen by
every pass.

Dimension key: R packed rows, S tokens a row (seq_len), L text tokens a row (text_len), P patch dim,
N tokens of one clip, T/H/W pixel frames/height/width, t/h/w latent frames/height/width, C latent channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from soraax import checkpoints, diffusion, patches, sharding, train, weights
from soraax.models import Models, build
from soraax.text.encoders import frozen_params
from soraax.vae import VideoVAE

# (width, height) of the default frame, the landscape shape most of the synthetic data has.
DEFAULT_ASPECT = (3, 2)


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained DiT run ready to sample: its config, modules, params ({"dit", "text"}) and VAE params."""
    workdir: str
    cfg: ml_collections.ConfigDict
    models: Models
    params: Any
    vae_params: Any
    step: int
    ema: bool  # whether `params` are the EMA params


@dataclasses.dataclass(frozen=True)
class Clip:
    """One clip to sample, at the latent level.

    grid: patches along (t, h, w); key: the clip's own noise key. `clean_tokens` [N, P] with `cond_mask` [N]
    (both or neither) hold the masked tokens at those clean values, shown to the DiT at t = 0.
    `init_tokens` [N, P] with `strength` in [0, 1] (SDEdit): start from init_tokens noised to the clip's
    t at `strength` instead of from pure noise; strength 1 (the default) ignores them.
    `lowres_tokens` [N, Q] (a super-resolution run's clips, and only theirs): the low-res latent upsampled
    onto the clip's grid and already noised to `lowres_aug` (soraax/cascade.py), aligned with its tokens.
    """
    prompt: str
    grid: tuple[int, int, int]
    key: jax.Array
    clean_tokens: np.ndarray | None = None
    cond_mask: np.ndarray | None = None
    init_tokens: np.ndarray | None = None
    strength: float = 1.0
    lowres_tokens: np.ndarray | None = None
    lowres_aug: float = 0.0

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


# ------------------------------------------------------------------------------------------- sizes


def _frame_step(cfg) -> tuple[int, int]:
    """(fewest valid frames, spacing of valid frame counts): latent frames must fill whole time patches."""
    pt, ft = int(cfg.model.patch_size[0]), int(cfg.vae.temporal_factor)
    return 1 + ft * (pt - 1), ft * pt


def pixel_units(cfg) -> tuple[int, int]:
    """Pixels per patch along height and width."""
    _, ph, pw = (int(p) for p in cfg.model.patch_size)
    return int(cfg.vae.spatial_factor) * ph, int(cfg.vae.spatial_factor) * pw


def _check_frames(cfg, frames: int) -> int:
    """Time patches of a clip of `frames` frames; ValueError naming --frames and the nearest valid counts."""
    first, step = _frame_step(cfg)
    if frames < first or (frames - first) % step:
        below = first + step * ((frames - first) // step)
        options = [first] if frames < first else [below, below + step]
        raise ValueError(f"--frames {frames} is not a valid clip length: frames must be {first} + {step}*n "
                         f"(vae.temporal_factor={cfg.vae.temporal_factor}, time patch "
                         f"{cfg.model.patch_size[0]}); nearest valid: {' or '.join(map(str, options))}")
    return (frames - first) // step + 1


def check_size(cfg, *, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The patch grid (t, h, w) of a frames x height x width clip; a ValueError naming the flag otherwise."""
    nt = _check_frames(cfg, frames)
    grid = [nt]
    for flag, value, unit in zip(("--height", "--width"), (height, width), pixel_units(cfg)):
        if value < unit or value % unit:
            below = unit * (value // unit)
            options = [v for v in (below, below + unit) if v > 0]
            raise ValueError(f"{flag} {value} must be a positive multiple of {unit} (vae.spatial_factor="
                             f"{cfg.vae.spatial_factor} x patch {unit // cfg.vae.spatial_factor}); "
                             f"nearest valid: {' or '.join(map(str, options))}")
        grid.append(value // unit)
    tokens = math.prod(grid)
    if tokens > cfg.seq_len:
        fit = default_size(cfg, frames, budget=cfg.seq_len)
        raise ValueError(f"--frames {frames} --height {height} --width {width} is {tokens} tokens "
                         f"({'x'.join(map(str, grid))} patches), more than a packed row holds "
                         f"(seq_len={cfg.seq_len}); at {frames} frames e.g. --height {fit[0]} --width {fit[1]} fits")
    return tuple(grid)


def frame_size(cfg, frames: int, aspect: tuple[int, int] = DEFAULT_ASPECT, height: int | None = None,
               width: int | None = None) -> tuple[int, int]:
    """(height, width) as asked, the side not given from `aspect` (width, height) rounded to whole patches,
    and both, when neither is given, the largest frame near `aspect` within data.token_budget."""
    if height is None and width is None:
        return default_size(cfg, frames, aspect)
    aw, ah = aspect
    unit_h, unit_w = pixel_units(cfg)
    if width is None:
        return height, max(unit_w, round(height * aw / ah / unit_w) * unit_w)
    if height is None:
        return max(unit_h, round(width * ah / aw / unit_h) * unit_h), width
    return height, width


def default_size(cfg, frames: int, aspect: tuple[int, int] = DEFAULT_ASPECT,
                 budget: int | None = None) -> tuple[int, int]:
    """(height, width) of the largest frame near `aspect` (width, height) whose clip of `frames` frames fits
    `budget` tokens (default: data.token_budget, the size training clips were cut to)."""
    budget = int(cfg.data.token_budget if budget is None else budget)
    per_frame = budget // _check_frames(cfg, frames)
    if per_frame < 1:
        raise ValueError(f"--frames {frames} needs more than {budget} tokens even at one patch a frame; "
                         f"use fewer frames")
    aw, ah = aspect
    ratio = max(aw, ah) / min(aw, ah)
    short, long = 1, 1
    for side in range(1, per_frame + 1):  # the short side grows; the long side follows the aspect
        other = max(side, round(side * ratio))
        if short * long < side * other <= per_frame:
            short, long = side, other
    gh, gw = (short, long) if aw >= ah else (long, short)
    unit_h, unit_w = pixel_units(cfg)
    return gh * unit_h, gw * unit_w


# --------------------------------------------------------------------------------------------- runs


def _single_host_config(cfg) -> ml_collections.ConfigDict:
    # Sampling runs where it is asked to, not on the training mesh: params replicated over local devices.
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    return cfg


def load_run(workdir: str, use_ema: bool = True, step: int | None = None, task: str = "dit") -> Run:
    """The DiT run in `workdir` at `step` (default: latest), EMA params unless `use_ema=False`; with
    task="sr" a super-resolution stage (soraax/cascade.py).

    The VAE is `cfg.vae.checkpoint` or WORKDIR/vae, always its EMA params and cached latent statistics: the
    VAE that encoded the training latents.
    """
    cfg = checkpoints.read_config(workdir)
    if cfg.task != task:
        hint = (" - an SR run samples as a stage of --cascade BASE_DIR,SR_DIR" if cfg.task == "sr" else "")
        raise ValueError(f"{workdir} is a {cfg.task!r} run; sampling it needs a {task!r} run{hint}")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"{workdir} has no checkpoints yet ({checkpoint_dir} does not exist): "
                                f"train it with python -m soraax.train --config ... --workdir {workdir}")
    cfg = _single_host_config(cfg)
    mngr = checkpoints.manager(workdir, keep=cfg.keep_checkpoints, every=cfg.checkpoint_every)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir} has no complete checkpoint in {checkpoint_dir}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has steps {sorted(steps)}")
        mesh = sharding.make_mesh(cfg.mesh)
        _, _, abstract = train.create_state(cfg, (train.sr_task if task == "sr" else train.dit_task)(cfg), mesh)
        field = "ema_params" if use_ema else "params"
        state = checkpoints.restore_weights(mngr, abstract, fields=(field,), step=step)
    finally:
        mngr.close()
    from soraax.wan.folder import wan_vae_path
    if wan_vae_path(cfg):  # a run from Wan weights encoded with Wan's VAE (its module carries its statistics)
        from soraax.wan.vae_weights import load_wan_vae
        vae_params = jax.device_put(weights.materialise(load_wan_vae(wan_vae_path(cfg)).params))
        models = build(cfg)
    else:
        vae_dir = cfg.vae.checkpoint or os.path.join(workdir, "vae")
        vae_params = train.load_vae_params(cfg, vae_dir)
        latent_mean, latent_std = train.vae_latent_stats(cfg, vae_dir)
        models = build(cfg, latent_mean, latent_std)
    params = dict(state[field])
    if models.text.frozen:  # a pretrained encoder: from its own folder, never from the run's checkpoints
        params["text"] = jax.device_put(frozen_params(models.text))
    return Run(workdir=workdir, cfg=cfg, models=models, params=params, vae_params=vae_params, step=int(step),
               ema=use_ema)


def weights_config(config_path: str, folder: str) -> ml_collections.ConfigDict:
    """`config_path` (a configs/wan21_t2v_*.py) with init_from = `folder`, validated against the folder."""
    from soraax import config as config_lib
    return config_lib.validate(config_lib.load(config_path, {"init_from": folder}))


def load_weights_run(config_path: str, folder: str) -> Run:
    """A run made of open weights, no training needed: model.* of `config_path`, its transformer, text encoder
    and VAE read from a diffusers Wan 2.1 folder (each tensor checked by name and shape)."""
    from soraax.wan import dit_weights
    from soraax.wan.folder import TRANSFORMER, VAE
    from soraax.wan.vae_weights import load_wan_vae
    cfg = _single_host_config(weights_config(config_path, folder))
    models = build(cfg)
    wan = dit_weights.load_wan_transformer(os.path.join(folder, TRANSFORMER))
    dit_params = weights.materialise(wan.params)
    if not models.dit.scan_layers:
        raise ValueError("--weights samples with model.scan_layers=True, as the Wan configs set it")
    weights.check_tree(wan.params, dit_weights.abstract_params(models.dit, models.text.width), folder)
    vae = load_wan_vae(os.path.join(folder, VAE))  # models.vae is its module already (models.build)
    params = {"dit": jax.device_put(dit_params), "text": jax.device_put(frozen_params(models.text))}
    return Run(workdir=folder, cfg=cfg, models=models, params=params,
               vae_params=jax.device_put(weights.materialise(vae.params)), step=0, ema=False)


# ---------------------------------------------------------------------------------------- packing


def clip_key(seed: int, index: int) -> jax.Array:
    """The noise key of clip `index` of a call with `seed`."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def text_pad_len(cfg) -> int:
    """Wan's pipeline pads every caption's text states with zeros to 512 and its DiT attends to all 512 (no
    mask): the zeros, projected, are part of what its weights were trained on. model.text_pad_len > 0 samples
    the same way; 0 (soraax's own models) masks the padding."""
    return int(cfg.model.get("text_pad_len", 0))


def place_caption(ids, segment: int, start: int, pad: int, tokens_L, segment_ids_L, attend_ids_L) -> int:
    """Writes one caption's token ids into a row's text arrays at `start`, marked with `segment`, and what
    the DiT attends to: the tokens, or with model.text_pad_len (`pad`) the caption padded to it. Returns
    where the next caption starts."""
    end = start + len(ids)
    tokens_L[start:end] = ids
    segment_ids_L[start:end] = segment
    span = max(len(ids), pad)
    attend_ids_L[start:start + span] = segment
    return start + span


def make_clip(run: Run, prompt: str, *, frames: int, height: int, width: int, key: jax.Array) -> Clip:
    return Clip(prompt, check_size(run.cfg, frames=frames, height=height, width=width), key)


def pack_rows(token_counts: Sequence[int], text_counts: Sequence[int], *, seq_len: int, text_len: int,
              max_segments: int) -> list[list[int]]:
    """Clip indices per row, first-fit decreasing: a clip joins the first row with room for its tokens,
    its caption and one more segment."""
    rows, room = [], []  # room: [video tokens, text tokens, segments] left in each row
    for i in sorted(range(len(token_counts)), key=lambda i: -token_counts[i]):
        n, m = token_counts[i], text_counts[i]
        if n > seq_len or m > text_len:
            raise ValueError(f"clip {i} has {n} tokens and {m} text tokens; a row holds {seq_len} and {text_len}")
        for row, left in zip(rows, room):
            if left[0] >= n and left[1] >= m and left[2] >= 1:
                row.append(i)
                left[:] = [left[0] - n, left[1] - m, left[2] - 1]
                break
        else:
            rows.append([i])
            room.append([seq_len - n, text_len - m, max_segments - 1])
    return rows


def _check_conditioning(index: int, clip: Clip, patch_dim: int, lowres_dim: int = 0):
    if (clip.clean_tokens is None) != (clip.cond_mask is None):
        raise ValueError(f"clip {index}: clean_tokens and cond_mask come together; pass both or neither")
    if clip.cond_mask is not None and (np.shape(clip.clean_tokens) != (clip.num_tokens, patch_dim)
                                       or np.shape(clip.cond_mask) != (clip.num_tokens,)):
        raise ValueError(f"clip {index} with grid {clip.grid}: clean_tokens must be [{clip.num_tokens}, "
                         f"{patch_dim}] and cond_mask [{clip.num_tokens}]; got {np.shape(clip.clean_tokens)} "
                         f"and {np.shape(clip.cond_mask)}")
    if not 0.0 <= clip.strength <= 1.0:
        raise ValueError(f"clip {index}: strength {clip.strength} must lie in [0, 1]")
    if clip.strength < 1.0 and clip.init_tokens is None:
        raise ValueError(f"clip {index}: strength {clip.strength} starts from a noised input; pass init_tokens")
    if clip.init_tokens is not None and np.shape(clip.init_tokens) != (clip.num_tokens, patch_dim):
        raise ValueError(f"clip {index} with grid {clip.grid}: init_tokens must be [{clip.num_tokens}, "
                         f"{patch_dim}]; got {np.shape(clip.init_tokens)}")
    if (clip.lowres_tokens is not None) != bool(lowres_dim):
        raise ValueError(f"clip {index}: lowres_tokens are the conditioning of a super-resolution run, and "
                         f"every clip of one needs them; this run {'is' if lowres_dim else 'is not'} one")
    if lowres_dim and np.shape(clip.lowres_tokens) != (clip.num_tokens, lowres_dim):
        raise ValueError(f"clip {index} with grid {clip.grid}: lowres_tokens must be [{clip.num_tokens}, "
                         f"{lowres_dim}]; got {np.shape(clip.lowres_tokens)}")


def _packed_rows(run: Run, clips: Sequence[Clip], rows: Sequence[Sequence[int]], num_rows: int):
    """numpy arrays of `num_rows` packed rows (the ones past `rows` all padding), and each clip's
    (row, first token)."""
    cfg, tokenizer = run.cfg, run.models.tokenizer
    s, l, p = cfg.seq_len, cfg.text_len, run.models.dit.patch_dim
    batch = {"noise": np.zeros((num_rows, s, p), np.float32), "coords": np.zeros((num_rows, s, 3), np.int32),
             "segment_ids": np.zeros((num_rows, s), np.int32),
             "clean_tokens": np.zeros((num_rows, s, p), np.float32), "cond_mask": np.zeros((num_rows, s), bool),
             "init_tokens": np.zeros((num_rows, s, p), np.float32), "strength": np.ones((num_rows, s), np.float32),
             "text_tokens": np.zeros((num_rows, l), np.int32), "text_segment_ids": np.zeros((num_rows, l), np.int32),
             "uncond_tokens": np.zeros((num_rows, l), np.int32),
             "uncond_segment_ids": np.zeros((num_rows, l), np.int32),
             # What the DiT attends to: each caption's tokens, and with model.text_pad_len its zero padding.
             "text_attend_ids": np.zeros((num_rows, l), np.int32),
             "uncond_attend_ids": np.zeros((num_rows, l), np.int32)}
    lowres_dim = run.models.dit.lowres_dim
    if lowres_dim:
        batch["lowres_tokens"] = np.zeros((num_rows, s, lowres_dim), np.float32)
        batch["lowres_aug"] = np.zeros((num_rows, s), np.float32)
    empty = tokenizer.encode("", l)
    pad = text_pad_len(cfg)
    places = {}
    for r, members in enumerate(rows):
        start = text_start = 0
        for segment, i in enumerate(members, start=1):
            clip, n = clips[i], clips[i].num_tokens
            places[i] = (r, start)
            video = slice(start, start + n)
            batch["noise"][r, video] = np.asarray(jax.random.normal(clip.key, (n, p), jnp.float32))
            batch["coords"][r, video] = patches.grid_coords(clip.grid)
            batch["segment_ids"][r, video] = segment
            if clip.cond_mask is not None:
                batch["clean_tokens"][r, video] = clip.clean_tokens
                batch["cond_mask"][r, video] = clip.cond_mask
            if clip.init_tokens is not None:
                batch["init_tokens"][r, video] = clip.init_tokens
            batch["strength"][r, video] = clip.strength
            if lowres_dim:
                batch["lowres_tokens"][r, video] = clip.lowres_tokens
                batch["lowres_aug"][r, video] = clip.lowres_aug
            text_start = place_caption(tokenizer.encode(clip.prompt, l), segment, text_start, pad,
                                       batch["text_tokens"][r], batch["text_segment_ids"][r],
                                       batch["text_attend_ids"][r])
            # Every caption holds at least the empty caption's special tokens, so the empty ones fit
            # wherever the captions did (padded, each takes `pad` slots, as each caption does).
            slot = max(len(empty), pad)
            uncond = slice(slot * (segment - 1), slot * (segment - 1) + len(empty))
            batch["uncond_tokens"][r, uncond] = empty
            batch["uncond_segment_ids"][r, uncond] = segment
            batch["uncond_attend_ids"][r, slot * (segment - 1):slot * segment] = segment
            start += n
    return batch, places


# --------------------------------------------------------------------------------------- sampling


def _segment_time(t_RxS, segment_ids_RxS, max_segments: int):
    """Each token's segment t: the largest t among its segment's tokens (held tokens sit at 0, the rest share
    the clip's t)."""
    member_RxSxM = segment_ids_RxS[:, :, None] == jnp.arange(max_segments + 1)[None, None, :]
    t_RxM = jnp.max(jnp.where(member_RxSxM, t_RxS[:, :, None], 0.0), axis=1)
    return jnp.take_along_axis(t_RxM, segment_ids_RxS, axis=1)


def _released(x_RxSxP, t_RxS, conditioning, max_segments: int):
    """x and t with the tokens under conditioning["release"] given back to the noise: at their clip's t, on
    the path from their clean values to the clip's own noise, as training shows a clip it conditions on
    nothing. The unconditional pass of two-condition guidance sees no held tokens this way."""
    release_RxS = conditioning["release"]
    t_segment_RxS = _segment_time(t_RxS, conditioning["segment_ids"], max_segments)
    noised_RxSxP = diffusion.flow_interpolate(conditioning["clean_tokens"], conditioning["noise"], t_segment_RxS)
    return (jnp.where(release_RxS[..., None], noised_RxSxP.astype(x_RxSxP.dtype), x_RxSxP),
            jnp.where(release_RxS, t_segment_RxS, t_RxS))


def guidance_passes(guidance: float, image_guidance: float | None) -> str:
    """Which DiT passes a step needs: 'multi' with an image_guidance scale, else 'text' unless guidance is 1
    (the conditional model alone: half the compute, and exactly it)."""
    if image_guidance is not None:
        return "multi"
    return "cond" if float(guidance) == 1.0 else "text"


@functools.partial(jax.jit, static_argnames=("dit", "text_encoder", "steps", "max_segments", "base_tokens",
                                             "passes"))
def _sample_rows(params, rows, guidance, image_guidance, *, dit, text_encoder, steps: int, max_segments: int,
                 base_tokens: float, passes: str):
    """Packed rows of noise -> clean latent tokens [R, S, P] by `steps` Euler steps of the guided flow."""
    def encode_text(tokens_RxL, segment_ids_RxL):
        return text_encoder.apply({"params": params["text"]}, tokens_RxL, segment_ids_RxL)

    def model_fn(x_RxSxP, t_RxS, conditioning):
        if "release" in conditioning:
            x_RxSxP, t_RxS = _released(x_RxSxP, t_RxS, conditioning, max_segments)
        lowres = {}
        if "lowres_tokens" in conditioning:  # a super-resolution run: every pass sees the low-res latent
            lowres = dict(lowres_BxSxQ=conditioning["lowres_tokens"], aug_BxS=conditioning["lowres_aug"])
        return dit.apply({"params": params["dit"]}, x_RxSxP, conditioning["coords"], conditioning["segment_ids"],
                         t_RxS, conditioning["text_states"], conditioning["text_segment_ids"], **lowres)

    video = {k: rows[k] for k in ("coords", "segment_ids", "lowres_tokens", "lowres_aug") if k in rows}
    # The encoder gives exactly 0 past each caption; the DiT attends to those zeros where the model was
    # trained with them (model.text_pad_len, Wan), else they are masked like any padding.
    full = {"text_states": encode_text(rows["text_tokens"], rows["text_segment_ids"]),
            "text_segment_ids": rows["text_attend_ids"], **video}
    if passes == "cond":
        velocity = functools.partial(model_fn, conditioning=full)
    else:
        empty = {"text_states": encode_text(rows["uncond_tokens"], rows["uncond_segment_ids"]),
                 "text_segment_ids": rows["uncond_attend_ids"], **video}
        if passes == "text":  # held tokens held in both passes: guidance on the text alone
            velocity = diffusion.guided_velocity_fn(model_fn, full, empty, guidance)
        else:
            def releasing(conditioning, release_RxS):
                return {**conditioning, "release": release_RxS, "clean_tokens": rows["clean_tokens"],
                        "noise": rows["noise"]}
            held = jnp.zeros_like(rows["cond_mask"])
            velocity = diffusion.multi_guided_velocity_fn(
                model_fn, releasing(empty, rows["cond_mask"]), releasing(empty, held), releasing(full, held),
                text_scale=guidance, image_scale=image_guidance)
    shift_RxS = diffusion.token_shift(rows["segment_ids"], max_segments=max_segments, base_tokens=base_tokens)
    return diffusion.sample_flow(velocity, rows["noise"], num_steps=steps, method="euler", shift=shift_RxS,
                                 strength=rows["strength"], x_init=rows["init_tokens"],
                                 x_cond=rows["clean_tokens"], cond_mask=rows["cond_mask"])


def sample_latents(run: Run, clips: Sequence[Clip], *, steps: int, guidance: float,
                   image_guidance: float | None = None, progress: bool = False) -> list[np.ndarray]:
    """Samples every clip, packed into rows; returns each clip's latent [t, h, w, C] in input order.

    guidance scales the text; `image_guidance`, when given, separately scales the held tokens (the image or
    clip conditioned on): v = multi_cfg(v(empty caption, held tokens released), v(empty caption),
    v(caption)). Without it the held tokens are held in both passes of text guidance. A clip holding no
    tokens gets text guidance either way. Rows go to the DiT `batch_size` at a time (a partial last batch
    is padded with empty rows, so every call has one shape and compiles once).
    """
    cfg, models = run.cfg, run.models
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not clips:
        return []
    for i, clip in enumerate(clips):
        _check_conditioning(i, clip, models.dit.patch_dim, models.dit.lowres_dim)
    text_counts = [max(len(models.tokenizer.encode(c.prompt, cfg.text_len)), text_pad_len(cfg)) for c in clips]
    rows = pack_rows([c.num_tokens for c in clips], text_counts, seq_len=cfg.seq_len, text_len=cfg.text_len,
                     max_segments=cfg.max_segments)
    rows_per_call = min(len(rows), int(cfg.batch_size))
    latents: list[np.ndarray | None] = [None] * len(clips)
    calls = range(0, len(rows), rows_per_call)
    for first in tqdm(calls, desc="sampling", unit="batch", disable=not progress or len(calls) < 2):
        chunk = rows[first:first + rows_per_call]
        batch, places = _packed_rows(run, clips, chunk, rows_per_call)
        x_RxSxP = np.asarray(_sample_rows(
            run.params, batch, jnp.float32(guidance), jnp.float32(1.0 if image_guidance is None else image_guidance),
            dit=models.dit, text_encoder=models.text_encoder, steps=int(steps), max_segments=int(cfg.max_segments),
            base_tokens=float(cfg.diffusion.base_tokens), passes=guidance_passes(guidance, image_guidance)))
        for i, (r, start) in places.items():
            tokens_NxP = x_RxSxP[r, start:start + clips[i].num_tokens]
            latents[i] = patches.unpatchify(tokens_NxP, clips[i].grid, models.patch_size)
    return latents


@functools.partial(jax.jit, static_argnums=0)
def _decode_uint8(vae: VideoVAE, vae_params, z_1xtxhxwxC):
    video = vae.apply({"params": vae_params}, z_1xtxhxwxC, method=VideoVAE.decode)[0]
    return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def decode(run: Run, latents: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Latents [t, h, w, C] -> uint8 clips [T, H, W, 3], one at a time (one compile per clip shape)."""
    return [np.asarray(_decode_uint8(run.models.vae, run.vae_params, jnp.asarray(z)[None])) for z in latents]


def generate(run: Run, prompts: Sequence[str], *, frames: int, height: int, width: int, steps: int,
             guidance: float, seed: int, progress: bool = False) -> np.ndarray:
    """uint8 [N, T, H, W, 3]: one clip per prompt (frames = 1 is an image), clip i from noise key (seed, i).

    Sizes are checked before anything runs: H and W multiples of vae.spatial_factor x patch, frames
    1 + vae.temporal_factor*n, and a clip no longer than a packed row.
    """
    grid = check_size(run.cfg, frames=frames, height=height, width=width)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    clips = [Clip(prompt, grid, clip_key(seed, i)) for i, prompt in enumerate(prompts)]
    latents = sample_latents(run, clips, steps=steps, guidance=guidance, progress=progress)
    return np.stack(decode(run, latents))

"""Sora's sampling-time capabilities, all on one mechanism: a packed `Clip` whose held latent frames are given
clean (`cond_mask`, t = 0) while the rest is generated, sampled by `sampling.sample_latents`.

    image_to_video  the image is latent frame 0, held; the frames after it are generated
    extend          forward: the clip's last frames held at the start of each window, new frames after them;
                    backward: its first frames held at the end of each window, new frames before them;
                    window after window, so a clip of any length is one call
    edit            SDEdit: the clip's latent noised to t = strength and denoised under the new prompt
    connect         the end of clip a held at the start, the start of clip b held at the end, between them
                    the transition
    loop            a short clip of the prompt is sampled; a longer one then starts with its first latent
                    frames and ends with the latent frames that followed them, so its end leads into its start

Each returns uint8 [T, H, W, 3]. Inputs of any size work: each frame is cropped about its centre to the
output's aspect ratio, then resized (antialiased) to the output's size; the output size defaults to the
largest frame of the input's aspect within data.token_budget.

Frame arithmetic of the causal VAE (ft = vae.temporal_factor, 4 in every shipped config): 1 + ft*n pixel
frames are 1 + n latent frames. Latent frame 0 is pixel frame 0 alone, encoded as an image; latent frame
j >= 1 is pixel frames ft*(j-1)+1 .. ft*j, encoded after (causally: with) the frames before them. So:
  * adding m latent frames adds exactly ft*m pixel frames: `extend(frames=N)` needs N a multiple of ft.
  * a clip's frames held at the START of a window are encoded as a clip of their own (1 + ft*(k-1) frames
    -> k latent frames, latent 0 an image): exactly what training conditions on, a prefix of a clip.
  * frames held at the END of a window follow generated ones, so they must be group latents: a clip's
    frames 0 .. ft*k are encoded and latent frames 1..k (its pixel frames 1..ft*k) are held; the latent
    before them, whose last pixel frame is the clip's frame 0, is generated. Backward extension keeps the
    input's own frame 0 there and drops the regenerated one.
  * only a clip's first latent frame is an image, so the input's first frame can never sit mid-window:
    backward extension needs at least 1 + ft input frames.
Windows are stitched in pixels: each window is decoded alone and only its new frames are kept, so the
output holds the input's frames unchanged (resized) and every window the DiT sees begins like a training
clip. The conditioning frames come back, inside a decoded window, as their VAE round trip.

Held frames must fill whole time patches; every mode that holds frames needs model.patch_size[0] == 1
(all shipped configs) and says so otherwise. `edit` holds nothing and works with any time patch.

Dimension key: T/H/W pixel frames/height/width, t/h/w latent frames/height/width, C latent channels.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from soraax import patches, sampling
from soraax.data.pipeline import resize_video
from soraax.sampling import Clip, Run
from soraax.vae import encode_mean

DIRECTIONS = ("forward", "backward")
_RESIZE_CHUNK = 64  # frames resized at a time: a long input never needs a float copy of itself


# ------------------------------------------------------------------------------------ frame arithmetic


def _ft(cfg) -> int:
    return int(cfg.vae.temporal_factor)


def latent_frames(cfg, frames: int) -> int:
    """Latent frames of a clip of `frames` = 1 + ft*n pixel frames."""
    return 1 + (frames - 1) // _ft(cfg)


def pixel_frames(cfg, latents: int) -> int:
    """Pixel frames decoded from `latents` latent frames: 1 + ft*(latents - 1)."""
    return 1 + _ft(cfg) * (latents - 1)


def require_time_patch_1(cfg, mode: str):
    """ValueError unless a time patch is one latent frame: held frames must fill whole time patches, and
    the modes hold single latent frames (an image is one)."""
    pt = int(cfg.model.patch_size[0])
    if pt != 1:
        raise ValueError(f"{mode} holds single latent frames, but model.patch_size={tuple(cfg.model.patch_size)} "
                         f"groups {pt} latent frames into a time patch and conditioning holds whole patches; "
                         f"it needs a model with time patch 1")


def _valid_below(cfg, frames: int) -> int:
    """The longest valid clip length (1 + ft*n) of at most `frames` frames."""
    return 1 + _ft(cfg) * ((frames - 1) // _ft(cfg))


def default_window(cfg) -> int:
    """Frames of an extension window by default: data.max_frames, the longest clip the model trained on."""
    return _valid_below(cfg, int(cfg.data.max_frames))


@dataclasses.dataclass(frozen=True)
class ExtensionPlan:
    """How `extend` adds frames: which input frames it keeps and, per window, (held, generated) latent
    frames. Forward windows are held + generated; backward ones generated + 1 regenerated (the latent
    ending at the existing clip's frame 0) + held."""
    direction: str
    kept_frames: int
    windows: tuple[tuple[int, int], ...]

    @property
    def new_frames(self) -> int:
        return sum(generated for _, generated in self.windows)


def extension_windows(existing: int, new: int, *, window: int, overlap: int,
                      direction: str) -> list[tuple[int, int]]:
    """(held, generated) latent frames of each window adding `new` latent frames to a clip of `existing`.

    Each window holds `overlap` latent frames of what exists and generates the rest of `window`; the last
    one, with fewer frames left to make, holds more instead, so windows keep one size (and one compile).
    A clip shorter than a window is held whole. Backward windows count one latent more than held +
    generated: the regenerated latent just before the held frames.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
    extra = 0 if direction == "forward" else 1
    if not 1 <= overlap <= window - 1 - extra:
        raise ValueError(f"overlap {overlap} must be 1 .. {window - 1 - extra} for a {direction} window of "
                         f"{window} latent frames")
    available = existing - extra  # backward windows cannot hold the existing clip's latent frame 0
    if available < 1:
        raise ValueError(f"a clip of {existing} latent frame(s) has none to hold {direction}")
    windows = []
    while new > 0:
        held = min(available, max(overlap, window - extra - new))
        generated = min(new, window - extra - held)
        windows.append((held, generated))
        available, new = available + generated, new - generated
    return windows


def extension_plan(cfg, input_frames: int, extend: int, *, window: int, overlap: int | None = None) -> ExtensionPlan:
    """The plan for adding `extend` frames (> 0: after the clip, < 0: before it) to a clip of `input_frames`
    frames, `window` frames (--frames) at a time, each window holding `overlap` latent frames (default:
    half the window) of what exists. ValueErrors name the flag.

    The input is cut to 1 + ft*n frames, dropping up to ft - 1 of them at the far end from the new ones:
    its first frames when extending forward, its last when extending backward.
    """
    require_time_patch_1(cfg, "--extend")
    ft = _ft(cfg)
    if extend == 0 or extend % ft:
        below = ft * (abs(extend) // ft)
        options = [v for v in (below, below + ft) if v > 0]
        sign = "-" if extend < 0 else ""
        raise ValueError(f"--extend {extend}: new frames come {ft} per latent frame of the causal VAE "
                         f"(vae.temporal_factor={ft}), so |N| must be a positive multiple of {ft}; nearest valid: "
                         f"{' or '.join(sign + str(v) for v in options)}")
    direction = "forward" if extend > 0 else "backward"
    sampling._check_frames(cfg, window)
    latents = latent_frames(cfg, window)
    extra = 0 if direction == "forward" else 1
    if latents < 2 + extra:
        raise ValueError(f"--frames {window} is the extension window; a {direction} window needs at least "
                         f"{pixel_frames(cfg, 2 + extra)} frames (held and new latent frames"
                         f"{', and the regenerated one' if extra else ''})")
    if overlap is None:
        overlap = max(1, min((latents - 1) // 2, latents - 1 - extra))
    first = 1 + ft * extra
    if input_frames < first:
        raise ValueError(f"--video has {input_frames} frame(s); extending {direction} needs at least {first}: "
                         f"under the causal VAE a clip's first frame is an image and cannot be held after "
                         f"generated frames, so its frames 1..{ft} must be")
    kept = _valid_below(cfg, input_frames)
    windows = extension_windows(latent_frames(cfg, kept), abs(extend) // ft, window=latents, overlap=overlap,
                                direction=direction)
    return ExtensionPlan(direction=direction, kept_frames=kept, windows=tuple(windows))


def check_connect(cfg, frames: int, a_frames: int, b_frames: int, context: int = 1):
    """ValueError unless a transition of `frames` frames can hold `context` latent frames of each clip and
    generate at least one between them."""
    require_time_patch_1(cfg, "--connect")
    sampling._check_frames(cfg, frames)
    ft, latents = _ft(cfg), latent_frames(cfg, frames)
    if context < 1 or latents < 2 * context + 1:
        raise ValueError(f"--frames {frames} ({latents} latent frames) cannot hold {context} latent frame(s) "
                         f"of each clip and generate one between them; use --frames >= "
                         f"{pixel_frames(cfg, 2 * max(context, 1) + 1)}")
    for name, have, need in (("A", a_frames, 1 + ft * (context - 1)), ("B", b_frames, 1 + ft * context)):
        if have < need:
            raise ValueError(f"--connect clip {name} has {have} frame(s); holding {context} latent frame(s) of "
                             f"it needs {need}")


def loop_window(cfg, frames: int, context: int = 1) -> int:
    """Pixel frames of the window `loop` samples for a loop of `frames` (--frames; frames - 1 are written):
    one latent frame per held context frame more, `frames + ft*context`."""
    require_time_patch_1(cfg, "--loop")
    sampling._check_frames(cfg, frames)
    if context < 1 or latent_frames(cfg, frames) - 1 < context:
        raise ValueError(f"--loop --frames {frames} is too short to hold {context} latent frame(s) at each end; "
                         f"use --frames >= {pixel_frames(cfg, context + 1)}")
    return frames + _ft(cfg) * context


def edit_frames(cfg, input_frames: int, frames: int | None = None) -> int:
    """Frames of the clip `edit` works on: its first `frames` (valid, at most the input's), by default the
    longest valid prefix of the input."""
    first, step = sampling._frame_step(cfg)
    if frames is None:
        if input_frames < first:
            raise ValueError(f"--video has {input_frames} frame(s); editing needs at least {first}")
        return first + step * ((input_frames - first) // step)
    sampling._check_frames(cfg, frames)
    if frames > input_frames:
        raise ValueError(f"--frames {frames} is more than the {input_frames} frames --video has")
    return frames


def check_image_to_video(cfg, frames: int):
    require_time_patch_1(cfg, "--image")
    sampling._check_frames(cfg, frames)
    if frames == 1:
        raise ValueError("--image with --frames 1 would only return the image through the VAE; "
                         f"use --frames >= {1 + _ft(cfg)}")


# ------------------------------------------------------------------------------------------- inputs


def aspect(video_or_image: np.ndarray) -> tuple[int, int]:
    """(width, height) of a frame [H, W, 3] or clip [T, H, W, 3]."""
    height, width = np.shape(video_or_image)[-3:-1]
    return int(width), int(height)


def fit_video(video_uint8: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H', W', 3] (or one frame [H', W', 3]) -> uint8 [T, height, width, 3]: cropped about the centre
    to the output's aspect ratio, then resized antialiased (shrinking or growing)."""
    video = np.asarray(video_uint8)
    if video.ndim == 3:
        video = video[None]
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not video.shape[0]:
        raise ValueError(f"an input clip must be uint8 [T, H, W, 3] (or one frame [H, W, 3]); got {video.dtype} "
                         f"{video.shape}")
    _, in_h, in_w, _ = video.shape
    if in_w * height > in_h * width:  # wider than the output: keep the middle columns
        keep = max(1, round(in_h * width / height))
        video = video[:, :, (in_w - keep) // 2:(in_w - keep) // 2 + keep]
    else:
        keep = max(1, round(in_w * height / width))
        video = video[:, (in_h - keep) // 2:(in_h - keep) // 2 + keep]
    chunks = [resize_video(video[i:i + _RESIZE_CHUNK], height, width) for i in range(0, len(video), _RESIZE_CHUNK)]
    return _to_uint8(np.concatenate(chunks))


def _to_uint8(video_float: np.ndarray) -> np.ndarray:
    return np.round((np.clip(video_float, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def encode(run: Run, video_uint8: np.ndarray) -> np.ndarray:
    """uint8 [T = 1 + ft*n, H, W, 3] -> the latent [1 + n, h, w, C] the DiT samples in (the posterior mean)."""
    video = np.asarray(video_uint8, np.float32) * (2.0 / 255.0) - 1.0
    return np.asarray(encode_mean(run.models.vae, run.vae_params, video[None]))[0]


def round_trip(run: Run, video_uint8: np.ndarray) -> np.ndarray:
    """uint8 video -> encode -> decode -> uint8: what a held clip looks like after the VAE."""
    return sampling.decode(run, [encode(run, video_uint8)])[0]


def held_clip(run: Run, prompt: str, latent_thwC: np.ndarray, held_t: Sequence[bool], key: jax.Array) -> Clip:
    """A Clip of `latent` [t, h, w, C] whose latent frames where `held_t` [t] is True are held clean; the
    values of the other frames are never read."""
    held_t = np.asarray(held_t, bool)
    if held_t.shape != (latent_thwC.shape[0],) or held_t.all():
        raise ValueError(f"held_t must be [{latent_thwC.shape[0]}] bools, not all True; got {held_t.tolist()}")
    require_time_patch_1(run.cfg, "holding latent frames")
    tokens_NxP, coords_Nx3 = patches.patchify(np.asarray(latent_thwC, np.float32), run.models.patch_size)
    grid = patches.grid_shape(latent_thwC.shape, run.models.patch_size)
    return Clip(prompt, grid, key, clean_tokens=tokens_NxP, cond_mask=held_t[coords_Nx3[:, 0]])


def _latent_window(latents: int, pieces: dict[int, np.ndarray], like: np.ndarray):
    """(latent [latents, h, w, C] with `pieces` {first latent frame: latent} in place and zeros elsewhere,
    held_t [latents])."""
    latent = np.zeros((latents, *like.shape[1:]), np.float32)
    held_t = np.zeros(latents, bool)
    for start, piece in pieces.items():
        latent[start:start + len(piece)] = piece
        held_t[start:start + len(piece)] = True
    return latent, held_t


# ------------------------------------------------------------------------------------ window clips


def extension_clip(run: Run, video_uint8: np.ndarray, prompt: str, *, held: int, generated: int, direction: str,
                   key: jax.Array) -> Clip:
    """One extension window over the clip so far (uint8 [T, H, W, 3], at the output size).

    forward: its last 1 + ft*(held-1) frames, encoded as a clip of their own, are latent frames 0..held-1;
      `generated` latent frames follow.
    backward: its frames 0..ft*held are encoded and latent frames 1..held held at the end; before them
      `generated` new latent frames and the one whose last frame is the clip's frame 0.
    """
    ft = _ft(run.cfg)
    if direction == "forward":
        context = encode(run, video_uint8[-(1 + ft * (held - 1)):])
        latent, held_t = _latent_window(held + generated, {0: context}, context)
    elif direction == "backward":
        context = encode(run, video_uint8[:1 + ft * held])[1:]
        latent, held_t = _latent_window(generated + 1 + held, {generated + 1: context}, context)
    else:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
    return held_clip(run, prompt, latent, held_t, key)


def stitch(cfg, video_uint8: np.ndarray, window_uint8: np.ndarray, *, held: int, generated: int,
           direction: str) -> np.ndarray:
    """The clip so far with a decoded window's new frames added, exactly ft*generated of them."""
    ft = _ft(cfg)
    if direction == "forward":
        return np.concatenate([video_uint8, window_uint8[1 + ft * (held - 1):]])
    # Frame ft*generated of the window is the regenerated slot of the clip's own frame 0, which is kept.
    return np.concatenate([window_uint8[:ft * generated], video_uint8])


def connect_clip(run: Run, a_uint8: np.ndarray, b_uint8: np.ndarray, prompt: str, *, frames: int, context: int,
                 key: jax.Array) -> Clip:
    """A transition of `frames` frames: a's last 1 + ft*(context-1) frames as its first `context` latent
    frames, b's frames 1..ft*context (encoded from b's start) as its last `context`, generated between."""
    ft, latents = _ft(run.cfg), latent_frames(run.cfg, frames)
    start = encode(run, a_uint8[-(1 + ft * (context - 1)):])
    end = encode(run, b_uint8[:1 + ft * context])[1:]
    latent, held_t = _latent_window(latents, {0: start, latents - context: end}, start)
    return held_clip(run, prompt, latent, held_t, key)


def loop_clip(run: Run, seed_latent: np.ndarray, prompt: str, *, frames: int, context: int, key: jax.Array) -> Clip:
    """The window of a loop of `frames` from a sampled clip's latent [context + 1, h, w, C]: its latent frames
    0..context-1 at the start, the ones that followed them, 1..context, at the end."""
    latents = latent_frames(run.cfg, loop_window(run.cfg, frames, context))
    latent, held_t = _latent_window(latents, {0: seed_latent[:context], latents - context: seed_latent[1:]},
                                    seed_latent)
    return held_clip(run, prompt, latent, held_t, key)


# ------------------------------------------------------------------------------------------- modes


def _defaults(run: Run, steps, guidance) -> tuple[int, float]:
    d = run.cfg.diffusion
    return int(d.sample_steps if steps is None else steps), float(d.guidance if guidance is None else guidance)


def _sample_one(run: Run, clip: Clip, *, steps, guidance, image_guidance=None) -> np.ndarray:
    (latent,) = sampling.sample_latents(run, [clip], steps=steps, guidance=guidance, image_guidance=image_guidance)
    return latent


def _sized(cfg, frames: int, source: np.ndarray, height, width) -> tuple[int, int]:
    height, width = sampling.frame_size(cfg, frames, aspect(source), height, width)
    sampling.check_size(cfg, frames=frames, height=height, width=width)
    return height, width


def image_to_video(run: Run, image: np.ndarray, prompt: str, *, frames: int, height: int | None = None,
                   width: int | None = None, steps: int | None = None, guidance: float | None = None,
                   image_guidance: float | None = None, seed: int = 0, index: int = 0) -> np.ndarray:
    """uint8 [frames, H, W, 3] starting from `image` (uint8 [H', W', 3], or a clip whose first frame is used):
    the image is latent frame 0, held at t = 0; latent frames 1.. are generated. Frame 0 of the result is
    the image's VAE round trip."""
    check_image_to_video(run.cfg, frames)
    image = np.asarray(image)
    image = image[0] if image.ndim == 4 else image
    height, width = _sized(run.cfg, frames, image, height, width)
    steps, guidance = _defaults(run, steps, guidance)
    first = encode(run, fit_video(image, height, width))
    latent, held_t = _latent_window(latent_frames(run.cfg, frames), {0: first}, first)
    clip = held_clip(run, prompt, latent, held_t, sampling.clip_key(seed, index))
    return sampling.decode(run, [_sample_one(run, clip, steps=steps, guidance=guidance,
                                             image_guidance=image_guidance)])[0]


def extend(run: Run, video: np.ndarray, prompt: str, *, frames: int, direction: str = "forward",
           window: int | None = None, overlap: int | None = None, height: int | None = None,
           width: int | None = None, steps: int | None = None, guidance: float | None = None,
           image_guidance: float | None = None, seed: int = 0, index: int = 0,
           progress: bool = False) -> np.ndarray:
    """`video` (uint8 [T, H', W', 3]) with `frames` new frames after it (forward) or before it (backward).

    `frames` is a multiple of vae.temporal_factor. The input is cut to 1 + ft*n frames (see
    `extension_plan`) and fitted to the output size; its frames come back unchanged in the result, of
    `kept + frames` frames. Windows of `window` frames (default data.max_frames, the training clip length)
    each hold `overlap` latent frames of what exists (default: half a window) and generate the rest; see
    `extension_windows`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
    window = default_window(run.cfg) if window is None else window
    plan = extension_plan(run.cfg, len(video), frames if direction == "forward" else -frames, window=window,
                          overlap=overlap)
    height, width = _sized(run.cfg, window, video, height, width)
    steps, guidance = _defaults(run, steps, guidance)
    kept = video[-plan.kept_frames:] if direction == "forward" else video[:plan.kept_frames]
    clip_uint8 = fit_video(kept, height, width)
    key = sampling.clip_key(seed, index)
    for i, (held, generated) in enumerate(tqdm(plan.windows, desc="extending", unit="window",
                                               disable=not progress or len(plan.windows) < 2)):
        clip = extension_clip(run, clip_uint8, prompt, held=held, generated=generated, direction=direction,
                              key=jax.random.fold_in(key, i))
        window_uint8 = sampling.decode(run, [_sample_one(run, clip, steps=steps, guidance=guidance,
                                                         image_guidance=image_guidance)])[0]
        clip_uint8 = stitch(run.cfg, clip_uint8, window_uint8, held=held, generated=generated, direction=direction)
    return clip_uint8


def edit(run: Run, video: np.ndarray, prompt: str, *, strength: float, frames: int | None = None,
         height: int | None = None, width: int | None = None, steps: int | None = None,
         guidance: float | None = None, seed: int = 0, index: int = 0) -> np.ndarray:
    """SDEdit (Meng et al. 2022): `video`'s first `frames` frames (default: all, cut to a valid length)
    encoded, noised to t = strength (on the clip's shifted time grid, with the clip's own noise key) and
    denoised under `prompt` in `steps` Euler steps over that last part of the schedule.

    strength 0 returns the input's VAE round trip, without a DiT call; strength 1 is text->video from the
    same key, bit for bit.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--edit_strength {strength} must lie in [0, 1]: 0 keeps the clip, 1 ignores it")
    frames = edit_frames(run.cfg, len(video), frames)
    height, width = _sized(run.cfg, frames, video, height, width)
    steps, guidance = _defaults(run, steps, guidance)
    latent = encode(run, fit_video(video[:frames], height, width))
    if strength == 0.0:
        return sampling.decode(run, [latent])[0]
    tokens_NxP, _ = patches.patchify(latent, run.models.patch_size)
    clip = Clip(prompt, patches.grid_shape(latent.shape, run.models.patch_size), sampling.clip_key(seed, index),
                init_tokens=tokens_NxP, strength=float(strength))
    return sampling.decode(run, [_sample_one(run, clip, steps=steps, guidance=guidance)])[0]


def connect(run: Run, a: np.ndarray, b: np.ndarray, prompt: str, *, frames: int, context: int = 1,
            height: int | None = None, width: int | None = None, steps: int | None = None,
            guidance: float | None = None, image_guidance: float | None = None, seed: int = 0,
            index: int = 0) -> np.ndarray:
    """The transition from clip `a` into clip `b`: uint8 [frames, H, W, 3] (size from a's aspect by default).

    Only the transition is returned, not a or b. It begins with a's last 1 + ft*(context-1) frames and ends
    with b's frames 1..ft*context (both held, through the VAE); the frame before those is where b's frame
    0 falls. So `a[:-(1 + ft*(context-1))] + transition + b[1 + ft*context:]` plays a into b with no frame
    twice.
    """
    check_connect(run.cfg, frames, len(a), len(b), context)
    height, width = _sized(run.cfg, frames, a, height, width)
    steps, guidance = _defaults(run, steps, guidance)
    clip = connect_clip(run, fit_video(a, height, width), fit_video(b, height, width), prompt, frames=frames,
                        context=context, key=sampling.clip_key(seed, index))
    return sampling.decode(run, [_sample_one(run, clip, steps=steps, guidance=guidance,
                                             image_guidance=image_guidance)])[0]


def loop(run: Run, prompt: str, *, frames: int, context: int = 1, height: int | None = None,
         width: int | None = None, steps: int | None = None, guidance: float | None = None,
         image_guidance: float | None = None, seed: int = 0, index: int = 0) -> np.ndarray:
    """uint8 [frames - 1, H, W, 3] that plays on repeat without a seam: its last frame leads into its first.

    First a short clip of the prompt, 1 + ft*context frames, is sampled (text->video, the key of (seed,
    index): the loop starts as `generate` would). Then a window of frames + ft*context frames holds that
    clip's latent frames 0..context-1 at its start and the latent frames that followed them, 1..context,
    at its end. The generated latent before the end's held frames has the clip's frame 0 as its last
    frame: the model brings the loop back to where it began, moving on as the clip moved on. Everything
    from that frame on repeats the start and is dropped, hence frames - 1 frames (the period of the loop).
    Why not hold latent frame 0 at both ends: under the causal VAE it is an image, which only a clip's
    first frame can be; the end has to hold group latents.
    """
    window = loop_window(run.cfg, frames, context)
    height, width = sampling.frame_size(run.cfg, window, sampling.DEFAULT_ASPECT, height, width)
    sampling.check_size(run.cfg, frames=window, height=height, width=width)
    steps, guidance = _defaults(run, steps, guidance)
    key = sampling.clip_key(seed, index)
    start = Clip(prompt, sampling.check_size(run.cfg, frames=1 + _ft(run.cfg) * context, height=height,
                                             width=width), key)
    seed_latent = _sample_one(run, start, steps=steps, guidance=guidance)
    clip = loop_clip(run, seed_latent, prompt, frames=frames, context=context, key=jax.random.fold_in(key, 1))
    window_uint8 = sampling.decode(run, [_sample_one(run, clip, steps=steps, guidance=guidance,
                                                     image_guidance=image_guidance)])[0]
    return window_uint8[:frames - 1]

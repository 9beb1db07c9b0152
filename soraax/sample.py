"""Text to video:
`python -m soraax.sample --workdir runs/tiny --prompt "a red square moving left on a black background" --out clip.mp4`.

The capability flags pick one other mode (soraax/capabilities.py; docs/sample.md shows each): `--image`
(image->video), `--video` with `--extend N` (N frames after the clip, or before it for N < 0) or
`--edit_strength S` (SDEdit), `--connect A B` (a transition from A into B), `--loop`; `--image_guidance`
scales the held image/clip separately from the text. `--cascade BASE_DIR,SR_DIR` (instead of --workdir)
samples text->video with the base run, then with each super-resolution run at its higher size, and decodes
once (soraax/cascade.py); --frames/--height/--width are then the output's, the final stage's.

Writes the clip (.mp4, .gif, or .png for one frame: `--frames 1`, or an --out ending .png, which keeps the
first frame) and, for a video, a contact sheet `<out>_sheet.png` of its frames. `--num N` samples N clips of
the prompt, packed together, written as `<out>_0.mp4`, `<out>_1.mp4`, ...; clip i depends on (--seed, i)
only, so `_0` is what `--num 1` gives. Sizes default to the largest 3:2 frame whose clip fits the config's
`data.token_budget` (64x96 at 17 frames for configs/tiny.py), steps and guidance to the config's
`diffusion.sample_steps` and `diffusion.guidance`. Every problem with the flags, the workdir, the sizes or
the input files is one line on stderr and exit code 2, before anything is computed.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads: XLA's CPU buffers on huge pages (soraax/host_memory.py)
    from soraax import host_memory
    host_memory.reexec_with_huge_pages()

import argparse
import dataclasses
import math
import os
import sys
from typing import Sequence

import jax
import numpy as np

from soraax import capabilities, cascade, checkpoints, sampling
from soraax.data.video_io import VideoDecodeError, contact_sheet, read_video, write_image, write_video
from soraax.text.expand import expand_prompt

EXTENSIONS = (".mp4", ".gif", ".png")
DEFAULT_FRAMES = 17
# Modes whose clips hold frames, which --image_guidance scales.
CONDITIONED = ("image", "extend", "connect", "loop")


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other input error: one line, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m soraax.sample", description="Sample clips from a trained soraax run.")
    runs = p.add_mutually_exclusive_group(required=True)
    runs.add_argument("--workdir", help="the training run's folder (config.json, checkpoints/)")
    runs.add_argument("--weights", metavar="DIR",
                      help="open weights instead of a run: a diffusers Wan 2.1 folder (transformer/, text_encoder/, "
                           "tokenizer/, vae/), with --config configs/wan21_t2v_1_3b.py (or _14b) describing it")
    runs.add_argument("--cascade", metavar="BASE_DIR,SR_DIR",
                      help="text->video through a cascade: the base DiT run, then super-resolution runs (task 'sr', "
                           "e.g. configs/sr_tiny.py), comma-separated; one decode at the end. --frames/--height/"
                           "--width give the output (default: the base's size times the SR factors)")
    p.add_argument("--config", default=None, help="with --weights: the config whose model.* the folder holds")
    p.add_argument("--prompt", required=True,
                   help="what the clip should show, e.g. 'a red square moving left on a black background'")
    p.add_argument("--out", default="sample.mp4",
                   help="output file: .mp4 or .gif (video), .png (one frame); default sample.mp4")
    p.add_argument("--frames", type=int, default=None,
                   help="frames, 1 + vae.temporal_factor*n; 1 is an image (default 17). With --extend: the frames "
                        "of each window (default data.max_frames); with --edit_strength: the first frames of --video "
                        "to edit (default: all); with --loop: the loop plus its closing frame, which is dropped "
                        "(frames - 1 are written)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of vae.spatial_factor x patch (default: from data.token_budget)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of vae.spatial_factor x patch (default: from data.token_budget)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: diffusion.sample_steps)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1 = conditional model only (default: diffusion.guidance)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; clip i of a call uses (seed, i)")
    p.add_argument("--num", type=int, default=1, help="how many clips of the prompt (names get _0, _1, ...)")
    p.add_argument("--raw", action="store_true", help="sample with the raw params instead of the EMA params")
    p.add_argument("--expand", action="store_true",
                   help="rewrite the prompt in the detailed caption style first (soraax/text/expand.py)")
    p.add_argument("--expand_url", default="",
                   help="with --expand: an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) to rewrite "
                        "it; falls back to the built-in expander, with a warning, when it does not answer")
    p.add_argument("--expand_model", default="gpt-4o-mini", help="the chat model --expand_url serves")
    p.add_argument("--expand_timeout", type=float, default=10.0, help="seconds to wait for --expand_url")
    modes = p.add_argument_group("capabilities (one mode at a time; inputs of any size are cropped about the centre "
                                 "to the output's aspect, then resized)")
    modes.add_argument("--image", metavar="FILE", help="image->video: the image (or a clip's first frame) is frame 0; "
                                                       "the size defaults to its aspect")
    modes.add_argument("--video", metavar="FILE", help="the clip to --extend or to edit with --edit_strength")
    modes.add_argument("--extend", type=int, metavar="N",
                       help="with --video: N > 0 adds N frames after it, N < 0 adds -N before it (a multiple of "
                            "vae.temporal_factor), window after window; the output holds the clip's frames too")
    modes.add_argument("--edit_strength", type=float, metavar="S",
                       help="with --video, SDEdit: noise the clip to S in [0, 1] and denoise it under --prompt "
                            "(0 keeps the clip, 1 is plain text->video)")
    modes.add_argument("--connect", nargs=2, metavar=("A", "B"),
                       help="a transition of --frames frames that begins with A's last frame and ends with B's "
                            "first frames")
    modes.add_argument("--loop", action="store_true", help="a clip whose last frame leads into its first")
    modes.add_argument("--image_guidance", type=float, default=None, metavar="S",
                       help="guidance on the held image/clip, apart from --guidance on the text (default: none, "
                            "the held frames are held in both passes of text guidance)")
    return p


def _size(cfg, args, frames: int, aspect=sampling.DEFAULT_ASPECT) -> tuple[int, int]:
    """--height/--width: the token-budget size of `aspect` when both are missing, that aspect when one is."""
    return sampling.frame_size(cfg, frames, aspect, args.height, args.width)


def output_paths(out: str, num: int, frames: int) -> list[str]:
    """The file of each clip: `_i` before the extension when num > 1; .png for an image."""
    stem, extension = os.path.splitext(out)
    if extension.lower() not in EXTENSIONS:
        raise ValueError(f"--out {out}: unsupported extension {extension!r}; use one of {EXTENSIONS}")
    if frames == 1:
        extension = ".png"
    suffixes = [f"_{i}" for i in range(num)] if num > 1 else [""]
    return [f"{stem}{suffix}{extension}" for suffix in suffixes]


def write_clip(path: str, video_THWC: np.ndarray) -> list[str]:
    """Writes one clip (a .png keeps the first frame) and, for a video, its contact sheet; returns the paths."""
    if os.path.splitext(path)[1].lower() == ".png":
        write_image(path, video_THWC[0])
        return [path]
    write_video(path, video_THWC)
    sheet = f"{os.path.splitext(path)[0]}_sheet.png"
    write_image(sheet, contact_sheet(video_THWC, columns=math.ceil(math.sqrt(len(video_THWC)))))
    return [path, sheet]


@dataclasses.dataclass(frozen=True)
class Job:
    """What the flags ask for, checked: the mode, its sizes, its inputs (uint8 clips) and the output files."""
    mode: str             # text | image | extend | edit | connect | loop
    frames: int           # --frames resolved: the clip, or the window (--extend), or the loop's (--loop)
    out_frames: int       # frames each written clip has
    height: int
    width: int
    steps: int
    paths: list[str]
    inputs: dict
    notes: tuple[str, ...] = ()


def _mode(args) -> str:
    """The one mode the capability flags name; ValueError for combinations that mean nothing."""
    chosen = [flag for flag, given in (("--image", args.image is not None), ("--video", args.video is not None),
                                       ("--connect", args.connect is not None), ("--loop", args.loop)) if given]
    if args.cascade is not None:
        others = chosen + [flag for flag, value in (("--extend", args.extend), ("--edit_strength", args.edit_strength),
                                                    ("--image_guidance", args.image_guidance)) if value is not None]
        if others:
            raise ValueError(f"--cascade samples text->video; it does not combine with {others[0]}")
        return "cascade"
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} are different modes; use one at a time")
    for flag, value in (("--extend", args.extend), ("--edit_strength", args.edit_strength)):
        if value is not None and args.video is None:
            raise ValueError(f"{flag} works on a clip: pass it with --video FILE")
    if args.video is not None:
        if (args.extend is None) == (args.edit_strength is None):
            raise ValueError("--video needs exactly one of --extend N (add frames) or --edit_strength S (SDEdit)")
        mode = "extend" if args.extend is not None else "edit"
    else:
        mode = "image" if args.image else "connect" if args.connect else "loop" if args.loop else "text"
    if args.edit_strength is not None and not 0.0 <= args.edit_strength <= 1.0:
        raise ValueError(f"--edit_strength {args.edit_strength} must lie in [0, 1]: 0 keeps the clip, 1 ignores it")
    if args.image_guidance is not None and mode not in CONDITIONED:
        what = "text->video" if mode == "text" else "--edit_strength"
        raise ValueError(f"--image_guidance scales held frames, which {what} has none; use it with --image, "
                         f"--extend, --connect or --loop")
    return mode


def _read(flag: str, path: str, max_frames: int | None = None) -> np.ndarray:
    try:
        return read_video(path, max_frames=max_frames)
    except VideoDecodeError as error:
        raise ValueError(f"{flag}: {error}") from error


def _prepare(args) -> Job:
    """Everything that can fail on the user's input, checked before any compute."""
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    mode = _mode(args)
    if mode == "cascade":
        return _prepare_cascade(args)
    if bool(args.weights) != bool(args.config):
        raise ValueError("--weights DIR and --config FILE go together (e.g. --weights Wan2.1-T2V-1.3B-Diffusers "
                         "--config configs/wan21_t2v_1_3b.py); a --workdir run has its own config")
    cfg = (sampling.weights_config(args.config, args.weights) if args.weights
           else checkpoints.read_config(args.workdir))
    frames = DEFAULT_FRAMES if args.frames is None else args.frames
    inputs, notes, out_frames = {}, [], frames
    if mode == "text":
        height, width = _size(cfg, args, frames)
    elif mode == "image":
        inputs["image"] = _read("--image", args.image, max_frames=1)[0]
        capabilities.check_image_to_video(cfg, frames)
        height, width = _size(cfg, args, frames, capabilities.aspect(inputs["image"]))
    elif mode == "extend":
        frames = capabilities.default_window(cfg) if args.frames is None else args.frames
        video = inputs["video"] = _read("--video", args.video)
        plan = capabilities.extension_plan(cfg, len(video), args.extend, window=frames)
        height, width = _size(cfg, args, frames, capabilities.aspect(video))
        out_frames = plan.kept_frames + abs(args.extend)
        if plan.kept_frames < len(video):
            notes.append(f"--video {args.video} has {len(video)} frames; extending its "
                         f"{'last' if args.extend > 0 else 'first'} {plan.kept_frames} (the causal VAE takes 1 + "
                         f"{cfg.vae.temporal_factor}*n)")
    elif mode == "edit":
        video = inputs["video"] = _read("--video", args.video)
        frames = out_frames = capabilities.edit_frames(cfg, len(video), args.frames)
        height, width = _size(cfg, args, frames, capabilities.aspect(video))
        if frames < len(video):
            notes.append(f"--video {args.video} has {len(video)} frames; editing its first {frames}")
    elif mode == "connect":
        inputs["a"], inputs["b"] = (_read("--connect", path) for path in args.connect)
        capabilities.check_connect(cfg, frames, len(inputs["a"]), len(inputs["b"]))
        height, width = _size(cfg, args, frames, capabilities.aspect(inputs["a"]))
    else:
        window = capabilities.loop_window(cfg, frames)
        height, width = _size(cfg, args, window)
        sampling.check_size(cfg, frames=window, height=height, width=width)
        out_frames = frames - 1
    sampling.check_size(cfg, frames=frames, height=height, width=width)
    steps = cfg.diffusion.sample_steps if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    return Job(mode=mode, frames=frames, out_frames=out_frames, height=height, width=width, steps=steps,
               paths=output_paths(args.out, args.num, out_frames), inputs=inputs, notes=tuple(notes))


def _prepare_cascade(args) -> Job:
    """--cascade: every folder is the right kind of run (a DiT, then SR runs on its VAE) and every stage's
    size works, before anything is loaded."""
    workdirs = [d.strip() for d in args.cascade.split(",")]
    if len(workdirs) < 2 or not all(workdirs):
        raise ValueError(f"--cascade {args.cascade!r}: give the base run and the SR run(s) as BASE_DIR,SR_DIR")
    for workdir in workdirs:
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"--cascade: {workdir} is not a folder (a training run's workdir)")
    cfgs = [checkpoints.read_config(workdir) for workdir in workdirs]
    cascade.check_stages(cfgs, workdirs)
    frames = DEFAULT_FRAMES if args.frames is None else args.frames
    sizes = cascade.stage_sizes(cfgs, workdirs, frames=frames, height=args.height, width=args.width)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    steps = cfgs[0].diffusion.sample_steps if args.steps is None else args.steps
    _, height, width = sizes[-1]
    notes = (f"cascade: {' -> '.join('x'.join(map(str, size)) for size in sizes)}",)
    return Job(mode="cascade", frames=frames, out_frames=frames, height=height, width=width, steps=steps,
               paths=output_paths(args.out, args.num, frames), inputs={"workdirs": workdirs}, notes=notes)


def _sample(run, job: Job, args, prompt: str, guidance: float) -> list[np.ndarray]:
    """The clips the job asks for: text->video packs all of them; the other modes make clip i from (seed, i)."""
    size = dict(height=job.height, width=job.width, steps=job.steps, guidance=guidance)
    if job.mode == "cascade":  # `run` is the list of stages; each keeps its own steps and guidance unless given
        return list(cascade.generate(run, [prompt] * args.num, frames=job.frames, height=job.height,
                                     width=job.width, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                     progress=True))
    if job.mode == "text":
        return list(sampling.generate(run, [prompt] * args.num, frames=job.frames, seed=args.seed, progress=True,
                                      **size))
    held = dict(size, image_guidance=args.image_guidance)
    clips = []
    for index in range(args.num):
        key = dict(seed=args.seed, index=index)
        if job.mode == "image":
            clip = capabilities.image_to_video(run, job.inputs["image"], prompt, frames=job.frames, **held, **key)
        elif job.mode == "extend":
            clip = capabilities.extend(run, job.inputs["video"], prompt, frames=abs(args.extend),
                                       direction="forward" if args.extend > 0 else "backward", window=job.frames,
                                       progress=True, **held, **key)
        elif job.mode == "edit":
            clip = capabilities.edit(run, job.inputs["video"], prompt, strength=args.edit_strength,
                                     frames=job.frames, **size, **key)
        elif job.mode == "connect":
            clip = capabilities.connect(run, job.inputs["a"], job.inputs["b"], prompt, frames=job.frames,
                                        **held, **key)
        else:
            clip = capabilities.loop(run, prompt, frames=job.frames, **held, **key)
        clips.append(clip)
    return clips


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Runs the CLI; returns the paths written."""
    args = parser().parse_args(argv)
    try:
        job = _prepare(args)
        if job.mode == "cascade":
            stages = [sampling.load_run(workdir, use_ema=not args.raw, task="sr" if i else "dit")
                      for i, workdir in enumerate(job.inputs["workdirs"])]
            cascade.check_runs(stages)
            run = stages[0]
        elif args.weights:
            run = stages = sampling.load_weights_run(args.config, args.weights)
        else:
            run = stages = sampling.load_run(args.workdir, use_ema=not args.raw)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for note in job.notes:
        print(f"note: {note}")
    guidance = run.cfg.diffusion.guidance if args.guidance is None else args.guidance
    prompt = args.prompt
    if args.expand or args.expand_url:
        prompt = expand_prompt(prompt, url=args.expand_url, model=args.expand_model, timeout=args.expand_timeout,
                               moving=job.out_frames > 1)
        print(f"prompt expanded to: {prompt}")
    videos = _sample(stages, job, args, prompt, guidance)
    written = []
    for path, video in zip(job.paths, videos):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        written += write_clip(path, video)
    image_guidance = "" if args.image_guidance is None else f", image guidance {args.image_guidance}"
    source = f"weights {args.weights}" if args.weights else f"step {run.step} ({'EMA' if run.ema else 'raw'} params)"
    print(f"{source}, {job.mode}, {job.out_frames}x{job.height}x"
          f"{job.width}, {job.steps} steps, guidance {guidance}{image_guidance}: wrote {', '.join(written)}")
    return written


if __name__ == "__main__":
    # Each clip shape compiles its own sampler and decoder; a persistent cache makes reruns start at once.
    if not jax.config.jax_compilation_cache_dir:  # $JAX_COMPILATION_CACHE_DIR, when set, wins
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/soraax/jax"))
    main()

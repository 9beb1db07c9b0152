"""Text to video: `python -m soraax.sample --workdir runs/tiny --prompt "a red square moving left" --out clip.mp4`.

Writes the clip (.mp4, .gif, or .png for one frame: `--frames 1`, or an --out ending .png, which keeps the
first frame) and, for a video, a contact sheet `<out>_sheet.png` of its frames. `--num N` samples N clips of
the prompt, packed together, written as `<out>_0.mp4`, `<out>_1.mp4`, ...; clip i depends on (--seed, i)
only, so `_0` is what `--num 1` gives. Sizes default to the largest 3:2 frame whose clip fits the config's
`data.token_budget` (64x96 at 17 frames for configs/tiny.py), steps and guidance to the config's
`diffusion.sample_steps` and `diffusion.guidance`. Every problem with the flags, the workdir or the sizes is
one line on stderr and exit code 2, before anything is computed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import jax
import numpy as np

from soraax import checkpoints, sampling
from soraax.data.video_io import contact_sheet, write_image, write_video
from soraax.text.expand import expand_prompt

EXTENSIONS = (".mp4", ".gif", ".png")


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other input error: one line, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m soraax.sample", description="Sample clips from a trained soraax run.")
    p.add_argument("--workdir", required=True, help="the training run's folder (config.json, checkpoints/)")
    p.add_argument("--prompt", required=True, help="what the clip should show, e.g. 'a red square moving left'")
    p.add_argument("--out", default="sample.mp4",
                   help="output file: .mp4 or .gif (video), .png (one frame); default sample.mp4")
    p.add_argument("--frames", type=int, default=17,
                   help="frames, 1 + vae.temporal_factor*n; 1 is an image (default 17)")
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
    return p


def _size(cfg, args) -> tuple[int, int]:
    """--height/--width: the token-budget size when both are missing, the default aspect when one is."""
    aw, ah = sampling.DEFAULT_ASPECT
    unit_h, unit_w = sampling.pixel_units(cfg)
    if args.height is None and args.width is None:
        return sampling.default_size(cfg, args.frames)
    if args.width is None:
        return args.height, max(unit_w, round(args.height * aw / ah / unit_w) * unit_w)
    if args.height is None:
        return max(unit_h, round(args.width * ah / aw / unit_h) * unit_h), args.width
    return args.height, args.width


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


def _prepare(args):
    """Everything that can fail on the user's input, checked before any compute: (steps, height, width, paths)."""
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    cfg = checkpoints.read_config(args.workdir)
    height, width = _size(cfg, args)
    sampling.check_size(cfg, frames=args.frames, height=height, width=width)
    steps = cfg.diffusion.sample_steps if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    return steps, height, width, output_paths(args.out, args.num, args.frames)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Runs the CLI; returns the paths written."""
    args = parser().parse_args(argv)
    try:
        steps, height, width, paths = _prepare(args)
        run = sampling.load_run(args.workdir, use_ema=not args.raw)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    guidance = run.cfg.diffusion.guidance if args.guidance is None else args.guidance
    prompt = args.prompt
    if args.expand or args.expand_url:
        prompt = expand_prompt(prompt, url=args.expand_url, model=args.expand_model, timeout=args.expand_timeout,
                               moving=args.frames > 1)
        print(f"prompt expanded to: {prompt}")
    videos = sampling.generate(run, [prompt] * args.num, frames=args.frames, height=height, width=width,
                               steps=steps, guidance=guidance, seed=args.seed, progress=True)
    written = []
    for path, video in zip(paths, videos):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        written += write_clip(path, video)
    print(f"step {run.step} ({'EMA' if run.ema else 'raw'} params), {args.frames}x{height}x{width}, "
          f"{steps} steps, guidance {guidance}: wrote {', '.join(written)}")
    return written


if __name__ == "__main__":
    # Each clip shape compiles its own sampler and decoder; a persistent cache makes reruns start at once.
    if not jax.config.jax_compilation_cache_dir:  # $JAX_COMPILATION_CACHE_DIR, when set, wins
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/soraax/jax"))
    main()

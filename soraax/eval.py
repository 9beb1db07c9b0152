"""Evaluation of a run: `python -m soraax.eval --workdir runs/tiny [--num_prompts N] [--steps S] [--out eval.json]`.

Two numbers that say whether a text-to-video model works, on data training never showed it:
  * prompt following: a clip per held-out synthetic prompt (shape/colour/direction triples absent from the
    train split) at each of a few aspect ratios, all sampled packed together, read back by
    `soraax.analyser` and scored per attribute, overall, and by how often left and right (up and down) swap;
  * the VAE's reconstruction PSNR on held-out synthetic clips, resized to the same sizes, and the same
    analyser's score of those reconstructions: what a perfect DiT could reach through this VAE;
  * `caption_gaps` (soraax/word_binding.py): on those clips, how much the DiT's loss rises when the caption's
    colour, shape or direction word is swapped: whether the model reads each word at all.
The result is one JSON object, printed and written to WORKDIR/eval.json (or --out); `evaluate` returns it.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads: XLA's CPU buffers on huge pages (soraax/host_memory.py)
    from soraax import host_memory
    host_memory.reexec_with_huge_pages()

import functools
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soraax import analyser, checkpoints, sampling, word_binding
from soraax.sample import CliParser
from soraax.data.pipeline import resize_video
from soraax.data.synthetic import SyntheticClips, heldout_prompts
from soraax.vae import VideoVAE, psnr

# (width, height): landscape, square, portrait; the same prompt should work at each.
ASPECT_RATIOS = ((3, 2), (1, 1), (2, 3))


def sizes(cfg, frames: int, aspect_ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS) -> dict[str, tuple[int, int]]:
    """{"W:H": (height, width)}: per aspect ratio, the largest frame whose clip fits data.token_budget."""
    return {f"{w}:{h}": sampling.default_size(cfg, frames, (w, h)) for w, h in aspect_ratios}


def prompt_following(run: sampling.Run, *, num_prompts: int, frames: int, steps: int, guidance: float,
                     seed: int, aspect_ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS) -> dict:
    """Scores clips of the held-out prompts (cycled when num_prompts exceeds them) at each aspect ratio."""
    prompts = [caption for caption, _ in heldout_prompts()]
    frame_sizes = sizes(run.cfg, frames, aspect_ratios)
    requests = [(prompts[i % len(prompts)], name) for i in range(num_prompts) for name in frame_sizes]
    clips = [sampling.make_clip(run, prompt, frames=frames, height=frame_sizes[name][0],
                                width=frame_sizes[name][1], key=sampling.clip_key(seed, i))
             for i, (prompt, name) in enumerate(requests)]
    videos = sampling.decode(run, sampling.sample_latents(run, clips, steps=steps, guidance=guidance,
                                                          progress=True))
    captions = [prompt for prompt, _ in requests]
    result = analyser.score(videos, captions)
    result["by_aspect_ratio"] = {
        name: analyser.score([v for v, (_, n) in zip(videos, requests) if n == name],
                             [p for p, n in requests if n == name])["overall"] for name in frame_sizes}
    result["sizes"] = {name: list(size) for name, size in frame_sizes.items()}
    result["clips"] = [{"prompt": prompt, "aspect_ratio": name, "read": analyser.analyse_clip(v).attributes()}
                       for v, (prompt, name) in zip(videos, requests)]
    return result


@functools.partial(jax.jit, static_argnames="vae")
def _round_trip(vae_params, video_1xTxHxWx3, *, vae: VideoVAE):
    """(PSNR, uint8 reconstruction [T, H, W, 3]) of encode -> decode through the posterior mean."""
    mean, _ = vae.apply({"params": vae_params}, video_1xTxHxWx3, method=VideoVAE.encode)
    recon = vae.apply({"params": vae_params}, mean, method=VideoVAE.decode)
    return psnr(video_1xTxHxWx3, recon), jnp.round((jnp.clip(recon[0], -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def heldout_clips(run: sampling.Run, *, num_clips: int, frames: int,
                  aspect_ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS) -> tuple[list[np.ndarray], list[str]]:
    """(float32 [T, H, W, 3] videos in [-1, 1], short captions) of held-out synthetic clips of `frames`
    frames, each resized to its aspect ratio's sampling size."""
    source = SyntheticClips(num_examples=num_clips, seed=run.cfg.seed, split="heldout",
                            aspect_ratios=aspect_ratios, durations=(frames,))
    frame_sizes = sizes(run.cfg, frames, aspect_ratios)
    examples = [source[i] for i in range(num_clips)]
    return ([resize_video(e["video"], *frame_sizes[e["aspect_ratio"]]) for e in examples],
            [e["caption"] for e in examples])


def vae_psnr(run: sampling.Run, videos: Sequence[np.ndarray], captions: Sequence[str]) -> dict:
    """Mean PSNR (dB) of encode -> decode (posterior mean) over `videos` (heldout_clips'), and the analyser's
    score of those reconstructions against their captions: the ceiling of prompt following, since every
    generated clip is a VAE decode."""
    values, recons = [], []
    for video in videos:
        value, recon = _round_trip(run.vae_params, jnp.asarray(video)[None], vae=run.models.vae)
        values.append(float(value))
        recons.append(np.asarray(recon))
    score = analyser.score(recons, captions)
    return {"psnr": float(np.mean(values)), "psnr_min": float(np.min(values)), "num_clips": len(videos),
            "reconstruction_following": {k: score[k] for k in ("colour", "shape", "direction", "overall")}}


def evaluate(workdir: str, *, use_ema: bool = True, **options) -> dict:
    """Prompt following and VAE PSNR of the run in `workdir` (latest checkpoint); see `evaluate_run`."""
    return evaluate_run(sampling.load_run(workdir, use_ema=use_ema), **options)


def evaluate_run(run: sampling.Run, *, num_prompts: int | None = None, steps: int | None = None,
                 guidance: float | None = None, frames: int = 17, seed: int = 0, num_vae_clips: int = 8,
                 num_gap_clips: int = 8, aspect_ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS) -> dict:
    """One JSON-ready dict: settings, `prompt_following` (analyser.score's fields, by_aspect_ratio, sizes,
    each clip's reading), `vae` (psnr) and, with num_gap_clips > 0, `caption_gaps` (word_binding). num_prompts
    defaults to every held-out prompt; steps and guidance to the config's."""
    started = time.perf_counter()
    num_prompts = len(heldout_prompts()) if num_prompts is None else num_prompts
    if num_prompts < 1 or num_vae_clips < 1 or num_gap_clips < 0:
        raise ValueError(f"--num_prompts ({num_prompts}) and --vae_clips ({num_vae_clips}) must be >= 1, "
                         f"--gap_clips ({num_gap_clips}) >= 0")
    if frames < 2:
        raise ValueError(f"--frames {frames}: the held-out prompts describe motion, so clips need frames > 1")
    steps = run.cfg.diffusion.sample_steps if steps is None else steps
    guidance = run.cfg.diffusion.guidance if guidance is None else guidance
    result = {
        "workdir": run.workdir, "step": run.step, "params": "ema" if run.ema else "raw", "steps": steps,
        "guidance": guidance, "frames": frames, "seed": seed,
        "prompt_following": prompt_following(run, num_prompts=num_prompts, frames=frames, steps=steps,
                                             guidance=guidance, seed=seed, aspect_ratios=aspect_ratios),
    }
    # One set of held-out clips for both: the first n of a larger set are the same clips.
    videos, captions = heldout_clips(run, num_clips=max(num_vae_clips, num_gap_clips), frames=frames,
                                     aspect_ratios=aspect_ratios)
    result["vae"] = vae_psnr(run, videos[:num_vae_clips], captions[:num_vae_clips])
    if num_gap_clips:
        result["caption_gaps"] = word_binding.caption_gaps(run, videos[:num_gap_clips], captions[:num_gap_clips],
                                                           seed=seed)
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    p = CliParser(prog="python -m soraax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's folder (config.json, checkpoints/)")
    p.add_argument("--num_prompts", type=int, default=None,
                   help=f"held-out prompts to sample, each at {len(ASPECT_RATIOS)} aspect ratios "
                        f"(default: all {len(heldout_prompts())}; more cycle them with new noise)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: diffusion.sample_steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: diffusion.guidance)")
    p.add_argument("--frames", type=int, default=17, help="frames of every clip (default 17)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--vae_clips", type=int, default=8, help="held-out clips for the VAE's PSNR (default 8)")
    p.add_argument("--gap_clips", type=int, default=8,
                   help="held-out clips for caption_gaps, the loss rise when a caption's colour, shape or "
                        "direction word is swapped (default 8; 0 skips it)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw params instead of the EMA params")
    p.add_argument("--out", default=None, help="where the JSON goes (default: WORKDIR/eval.json)")
    args = p.parse_args(argv)
    try:
        cfg = checkpoints.read_config(args.workdir)
        sizes(cfg, args.frames)
        if args.frames < 2:
            raise ValueError(f"--frames {args.frames}: the held-out prompts describe motion, so clips need "
                             "frames > 1")
        for flag, value in (("--num_prompts", args.num_prompts), ("--steps", args.steps),
                            ("--vae_clips", args.vae_clips)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if args.gap_clips < 0:
            raise ValueError(f"--gap_clips must be >= 0 (0 skips caption_gaps), got {args.gap_clips}")
        run = sampling.load_run(args.workdir, use_ema=not args.raw)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    result = evaluate_run(run, num_prompts=args.num_prompts, steps=args.steps, guidance=args.guidance,
                          frames=args.frames, seed=args.seed, num_vae_clips=args.vae_clips,
                          num_gap_clips=args.gap_clips)
    out = args.out or os.path.join(args.workdir, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    summary = {**result, "prompt_following": {k: v for k, v in result["prompt_following"].items() if k != "clips"}}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} (with what was read from each clip)", file=sys.stderr)  # stdout stays one JSON object
    return result


if __name__ == "__main__":
    if not jax.config.jax_compilation_cache_dir:  # $JAX_COMPILATION_CACHE_DIR, when set, wins
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/soraax/jax"))
    main()

"""soraax's train step against the PyTorch DiT of diffusers (DiTTransformer2DModel) at the same sizes, in one run.

    python benchmarks/peer.py [--sizes S,B] [--precisions float32,bfloat16] [--steps 10]
        [--torch_python /path/to/python] [--config.KEY=VALUE ...]

Two comparisons, each printed as one JSON line with the ratio soraax / torch:
  * same shapes: DiT-S/2 (384 x 12, 6 heads) and DiT-B/2 (768 x 12, 12 heads), a batch of 8 samples of
    256 tokens (a 16 x 16 patch grid of 2x2 latent cells, 4 channels), forward + backward + AdamW (+ grad
    clipping and EMA, which soraax's step does too). soraax: `--config` with those sizes, rows of 256 tokens,
    one clip a row; torch: benchmarks/peer_torch.py. Once per `--precisions` entry: float32 throughout, and
    bfloat16 matmuls (soraax `model.matmul_dtype=bfloat16`, torch `autocast(bfloat16)`: both keep params,
    norms and the optimizer in float32), each side's MFU against the peak of a matmul of that dtype.
  * mixed aspect: the native-aspect clip mix of benchmarks/packing.py (sized to 256 tokens a clip at most).
    soraax packs it into rows of `--mixed_seq_len` (as many rows as make the same 8 x 256 slots a step);
    the torch DiT takes square grids of one size only, so every clip is padded to the largest one's square
    (a clip's cost in a dense transformer is its token count, whatever its aspect). Its step is the same
    program as the same-shapes job whenever that square is 16 x 16, so that job's time is reused; its real
    tokens/sec = tokens/sec x the mix's padding efficiency. In float32 only.

The architectures are the same DiT except where soraax's is what packing needs: adaLN modulation per token
(each clip its own timestep) rather than per sample, and cross-attention to the clip's caption (cached text
states, `--text_len` tokens) rather than a class embedding. Both cost soraax FLOPs the peer does not do, so
FLOP/s (each side's own count: soraax.flops analytically, torch's FlopCounterMode) are reported beside
tokens/sec. Each same-shapes line also carries `soraax_pooled_only`: soraax with `model.cross_attn=False`
and `model.pooled_text=True`, the caption's mean embedding added to the timestep's as DiT adds its class
embedding: the peer's architecture, so the same work.

torch is never a soraax dependency: the torch side runs in a subprocess of `--torch_python` (default
/work/refenv/bin/python if it exists, else this interpreter); if that one cannot import torch and diffusers,
the line says so and carries soraax's numbers alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REF_PYTHON = "/work/refenv/bin/python"
# (width, depth, heads): DiT-S/2 and DiT-B/2 of Peebles & Xie (2023), and a 1-layer model for --tiny.
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "T": (32, 1, 2)}
PRECISIONS = ("float32", "bfloat16")


def torch_available(python: str) -> str | None:
    """None if `python` imports torch and diffusers' DiTTransformer2DModel, else why not."""
    try:
        done = subprocess.run([python, "-c", "import torch; from diffusers import DiTTransformer2DModel"],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{python}: {error}"
    if done.returncode:
        return f"{python} cannot import torch/diffusers: {done.stderr.strip().splitlines()[-1:]}"
    return None


def run_torch(python: str, jobs: list[dict], steps: int, warmup: int) -> list[dict]:
    cmd = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch.py"),
           "--jobs", json.dumps(jobs), "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its stderr (progress) passes through
    if done.returncode:
        sys.exit(f"peer: the torch side failed (exit {done.returncode}); its stderr is above")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def soraax_step(cfg, clips: list[dict], steps: int, warmup: int, peak: float) -> dict:
    """The real train step on `clips` packed by soraax's packer: tokens/sec, FLOP/s, MFU."""
    import numpy as np
    from soraax import flops, train
    batches = common.pack(cfg, clips)
    if not batches:
        raise SystemExit(f"peer: {len(clips)} clips make no full batch of {cfg.batch_size} x {cfg.seq_len}")
    task = train.dit_task(cfg)
    step = common.TrainStep(cfg, task, batches[0])
    timing = step.time(batches, warmup=warmup, steps=steps)
    real = float(np.mean([(b["segment_ids"] > 0).sum() for b in batches]))
    count = flops.dit_train_flops(cfg, step.abstract.params, step.abstract.frozen)["flops_per_step"]
    s = timing["median_s"]
    return {"framework": "soraax", "params": train._param_count(step.abstract), "rows": cfg.batch_size,
            "seq_len": cfg.seq_len, "text_len": cfg.text_len, "packing_efficiency": real / (cfg.batch_size * cfg.seq_len),
            "real_tokens_per_step": real, "tokens_per_sec": real / s,
            "padded_tokens_per_sec": cfg.batch_size * cfg.seq_len / s, "step_time_s": s, "step_time": timing,
            "compile_s": step.compile_s, "flops_per_step": count, "achieved_flops_per_sec": count / s,
            "mfu": count / s / peak, "memory": step.memory()}


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="S,B", help=f"DiT sizes of {sorted(SIZES)}, comma-separated")
    p.add_argument("--batch", type=int, default=8, help="samples a step")
    p.add_argument("--side", type=int, default=16, help="patch grid side: side^2 tokens a sample")
    p.add_argument("--text_len", type=int, default=16, help="soraax: caption tokens a row")
    p.add_argument("--steps", type=int, default=10, help="timed steps per job and side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per job and side")
    p.add_argument("--precisions", default="float32,bfloat16",
                   help=f"matmul precisions of the same-shapes jobs, of {PRECISIONS}, comma-separated")
    p.add_argument("--mixed_sizes", default="S", help="sizes of the mixed-aspect comparison ('' for none)")
    p.add_argument("--mixed_seq_len", type=int, default=512, help="soraax's packed row length on the mix")
    p.add_argument("--mixed_clips", type=int, default=400, help="clips in the native-aspect mix")
    p.add_argument("--torch_python", default=REF_PYTHON if os.path.exists(REF_PYTHON) else sys.executable,
                   help="a Python with torch and diffusers, run in a subprocess")
    args, overrides = common.parse(p, argv)
    if args.tiny:
        args.sizes, args.mixed_sizes = "T", "T"
        args.batch, args.side, args.text_len, args.mixed_seq_len, args.mixed_clips = 2, 4, 8, 32, 24
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    sizes = [s for s in args.sizes.split(",") if s]
    mixed = [s for s in args.mixed_sizes.split(",") if s]
    for name in sizes + mixed:
        if name not in SIZES:
            p.error(f"unknown size {name!r}: one of {sorted(SIZES)}")
    if "model.matmul_dtype" in overrides:
        p.error("--config.model.matmul_dtype: the jobs set it themselves; choose them with --precisions")
    precisions = [x for x in args.precisions.split(",") if x]
    for precision in precisions:
        if precision not in PRECISIONS:
            p.error(f"unknown precision {precision!r}: one of {PRECISIONS}")

    import numpy as np

    tokens = args.side ** 2
    same_shapes = [(n, x) for n in sizes for x in precisions]
    jobs = [{"name": n, "precision": x, "autocast": None if x == "float32" else x, "width": SIZES[n][0],
             "depth": SIZES[n][1], "heads": SIZES[n][2], "batch": args.batch, "side": args.side}
            for n, x in dict.fromkeys(same_shapes + [(n, "float32") for n in mixed])]
    missing = torch_available(args.torch_python)
    torch_results = {}
    if missing:
        common.log(f"[peer] no torch side: {missing}")
    else:  # torch first, alone: the two sides never share the cores
        torch_results = {(r["name"], r["precision"]): r
                         for r in run_torch(args.torch_python, jobs, args.steps, args.warmup)}

    common.use_compilation_cache()
    peaks = {}
    for precision in dict.fromkeys(precisions + ["float32"]):
        common.log(f"[peer] matmul peak (2048^2, {precision})")
        peaks[precision] = common.matmul_peak(256 if args.tiny else 2048, precision)["flops_per_sec"]
    machine = common.machine()

    def config(name, **keys):
        width, depth, heads = SIZES[name]
        # A DiT of the peer's shape: 4 latent channels in 2x2 patches, no pooled text (the peer has none).
        base = {"model.width": width, "model.depth": depth, "model.heads": heads, "model.patch_size": "(1, 2, 2)",
                "vae.latent_channels": 4, "model.pooled_text": False, "text_len": args.text_len}
        return common.load_config(args.config, {**base, **{k: str(v) for k, v in keys.items()}, **overrides},
                                  tiny=args.tiny)

    def clips_of(cfg, grids, caption_len):
        return common.fake_clips(cfg, grids, [caption_len] * len(grids))

    def ratio(a, b, key):
        return a[key] / b[key] if b and b.get(key) else None

    base = {"benchmark": "peer", "config": os.path.relpath(args.config, common.ROOT), "overrides": overrides,
            "tiny": args.tiny, "machine": machine, "matmul_peaks_flops_per_sec": peaks,
            "torch_python": args.torch_python, "torch_status": missing or "ok"}
    for name, precision in same_shapes:
        peak = peaks[precision]
        common.log(f"[peer] soraax DiT-{name}/2: {args.batch} x {tokens} tokens, {precision} matmuls")
        shape = dict(batch_size=args.batch, seq_len=tokens, max_segments=1, **{"data.token_budget": tokens},
                     **{"model.matmul_dtype": precision})
        cfg = config(name, **shape)
        grids = [(1, args.side, args.side)] * 2 * args.batch
        ours = soraax_step(cfg, clips_of(cfg, grids, args.text_len // 2), args.steps, args.warmup, peak)
        common.log(f"[peer] soraax DiT-{name}/2, pooled caption only (the peer's architecture), {precision} matmuls")
        pooled_cfg = config(name, **shape, **{"model.cross_attn": False, "model.pooled_text": True})
        pooled = soraax_step(pooled_cfg, clips_of(pooled_cfg, grids, args.text_len // 2), args.steps, args.warmup, peak)
        theirs = torch_results.get((name, precision))
        if theirs:
            theirs["mfu"] = theirs["achieved_flops_per_sec"] / peak
        keys = ("tokens_per_sec", "achieved_flops_per_sec")
        common.emit({**base, "comparison": "same_shapes", "size": name, "precision": precision,
                     "matmul_peak_flops_per_sec": peak, "batch": args.batch,
                     "tokens_per_sample": tokens, "soraax": ours, "soraax_pooled_only": pooled, "torch": theirs,
                     "soraax_over_torch": {k: ratio(ours, theirs, k) for k in keys},
                     "soraax_pooled_only_over_torch": {k: ratio(pooled, theirs, k) for k in keys}})

    for name in mixed:
        slots = args.batch * tokens
        # Captions as long as the same-shapes rows' (text_len // 2 a clip), so the packer is not text-bound.
        cfg = config(name, batch_size=max(1, slots // args.mixed_seq_len), seq_len=args.mixed_seq_len,
                     max_segments=16, text_len=(args.text_len // 2) * 16,
                     **{"data.token_budget": tokens, "model.matmul_dtype": "float32"})
        grids = [common.patch_grid(cfg, s) for s in common.native_shapes(cfg, args.mixed_clips)]
        clip_tokens = [int(np.prod(g)) for g in grids]
        side = math.ceil(math.sqrt(max(clip_tokens)))  # the torch DiT's square grid that holds every clip
        common.log(f"[peer] soraax DiT-{name}/2 packed on the mix: {len(grids)} clips, {min(clip_tokens)}.."
                   f"{max(clip_tokens)} tokens, rows of {cfg.seq_len}; torch pads each to {side}^2")
        ours = soraax_step(cfg, clips_of(cfg, grids, args.text_len // 2), args.steps, args.warmup, peaks["float32"])
        theirs, efficiency = torch_results.get((name, "float32")), float(np.mean(clip_tokens)) / side ** 2
        if theirs and side != args.side:  # another program: time it (rare: the mix's largest clip fills side^2)
            job = {**next(j for j in jobs if (j["name"], j["precision"]) == (name, "float32")), "side": side}
            theirs = run_torch(args.torch_python, [job], args.steps, args.warmup)[0]
        padded = None
        if theirs:
            padded = {"padded_to": [side, side], "padding_efficiency": efficiency,
                      "step": f"{args.batch} x {side}^2 (the same-shapes job's program)" if side == args.side else
                      f"{args.batch} x {side}^2, timed for the mix",
                      "step_time_s": theirs["step_time_s"], "padded_tokens_per_sec": theirs["tokens_per_sec"],
                      "tokens_per_sec": theirs["tokens_per_sec"] * efficiency}
        common.emit({**base, "comparison": "mixed_aspect", "size": name, "precision": "float32",
                     "matmul_peak_flops_per_sec": peaks["float32"], "clips": len(grids),
                     "clip_tokens": {"min": min(clip_tokens), "mean": float(np.mean(clip_tokens)), "max": max(clip_tokens)},
                     "soraax_packed": ours, "torch_padded": padded,
                     "soraax_over_torch": {"real_tokens_per_sec": ratio(ours, padded, "tokens_per_sec")}})


if __name__ == "__main__":
    common.reexec_with_huge_pages()
    main()

"""Tokens/sec, MFU and memory of the real train step on real packed batches, and the input pipeline's own rate.

    python benchmarks/throughput.py --config configs/tiny.py [--steps 20] [--config.KEY=VALUE ...]
    python benchmarks/throughput.py --config configs/tiny.py --config.model.text_encoder=bert \
        --config.model.text_cache=True --config.text_len=96

Prints one JSON line. What is timed:
  * the loader: `train.dit_task(cfg, vae_params, stats).batches(0, 1)` (decode, resize, VAE encode, patchify,
    text cache, Patch n' Pack, prefetch thread) iterated alone, nothing else running: `--loader_warmup`
    batches untimed and more until `--loader_settle` in a row compiled nothing (its VAE encode jits once per
    clip shape), then `--loader_batches` timed. Compiles that
    still fell in the timed window are counted and their seconds reported, so a reader can see them.
  * the step: the jitted, sharded, donated step `train.sharded_step` builds, compiled ahead of time (outside
    the clock), run `--warmup` times, then `--steps` times one by one, each waited for; batches are real ones
    from the loader, fetched before the clock starts and placed on the mesh, so the step's time holds no
    input work. Tokens/sec are per median step.
  * the peak: a jitted [n, n] matmul in the model's matmul dtype (`model.matmul_dtype`, else `model.dtype`;
    and float32), best of several, in this run; MFU = analytic FLOPs (soraax.flops.dit_train_flops) / median
    step time / that peak.
The VAE is randomly initialised: an encode costs the same whatever its weights.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
    p.add_argument("--batches", type=int, default=8, help="distinct real batches the timed steps cycle through")
    p.add_argument("--loader_warmup", type=int, default=40,
                   help="loader batches before its clock starts (the VAE encode compiles once per clip shape)")
    p.add_argument("--loader_settle", type=int, default=10,
                   help="the warm-up goes on until this many batches in a row compiled nothing")
    p.add_argument("--loader_warmup_max", type=int, default=400, help="loader warm-up batches at most")
    p.add_argument("--loader_batches", type=int, default=40, help="loader batches timed")
    p.add_argument("--matmul_n", type=int, default=4096, help="side of the square matmul of the peak")
    args, overrides = common.parse(p, argv)
    if args.tiny:
        args.steps, args.warmup, args.batches = min(args.steps, 3), min(args.warmup, 1), min(args.batches, 2)
        args.loader_warmup, args.loader_batches = min(args.loader_warmup, 2), min(args.loader_batches, 3)
        args.loader_settle, args.loader_warmup_max = 0, 2
        args.matmul_n = min(args.matmul_n, 256)

    import numpy as np
    from soraax import flops, packing, sharding, train

    common.use_compilation_cache()
    cfg = common.load_config(args.config, overrides, tiny=args.tiny)
    if cfg.task != "dit":
        p.error(f"{args.config} is a {cfg.task!r} config; this benchmark times the DiT step")
    common.log(f"[throughput] building the task ({cfg.model.width}w x {cfg.model.depth}, {cfg.batch_size} rows "
               f"x {cfg.seq_len} tokens, text {cfg.model.get('text_encoder', 'bytes')})")
    task = train.dit_task(cfg, common.random_vae_params(cfg), (0.0, 1.0))
    mesh = sharding.make_mesh(cfg.mesh)

    # ---- the loader alone
    data = iter(task.batches(0, 1))
    host_batches, warmed, quiet = [], 0, 0
    common.log(f"[throughput] loader warm-up: >= {args.loader_warmup} batches, until {args.loader_settle} in a row "
               f"compile nothing (at most {args.loader_warmup_max})")
    while warmed < args.loader_warmup_max and (warmed < args.loader_warmup or quiet < args.loader_settle):
        with common.CompileCounter() as compiles:
            batch = next(data)
        quiet = 0 if compiles.count else quiet + 1
        warmed += 1
        if len(host_batches) < args.batches:
            host_batches.append(batch)
    real = slots = 0
    with common.CompileCounter() as compiles:
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            batch = next(data)
            real += int((batch["segment_ids"] > 0).sum())
            slots += int(batch["segment_ids"].size)
            if len(host_batches) < args.batches:
                host_batches.append(batch)
        loader_s = time.perf_counter() - start
    while len(host_batches) < args.batches:
        host_batches.append(next(data))
    if hasattr(data, "close"):
        data.close()
    loader = {"warmup_batches": warmed, "batches": args.loader_batches, "seconds": loader_s, "real_tokens_per_sec": real / loader_s,
              "padded_tokens_per_sec": slots / loader_s, "packing_efficiency": real / max(slots, 1),
              "compiles_in_window": compiles.count, "compile_seconds_in_window": compiles.seconds,
              "workers": int(cfg.data.workers)}
    if loader_s > compiles.seconds > 0:
        loader["real_tokens_per_sec_without_compiles"] = real / (loader_s - compiles.seconds)
    common.log(f"[throughput] loader: {loader['real_tokens_per_sec']:.0f} real tokens/s "
               f"({compiles.count} compiles in the window)")

    # ---- the step
    stats = [packing.packing_stats(b["segment_ids"]) for b in host_batches]
    real_per_step = float(np.mean([s["real_tokens"] for s in stats]))
    slots_per_step = cfg.batch_size * cfg.seq_len
    common.log(f"[throughput] compiling the step, then {args.warmup} warm-up and {args.steps} timed steps")
    step = common.TrainStep(cfg, task, host_batches[0], mesh)
    timing, abstract = step.time(host_batches, warmup=args.warmup, steps=args.steps), step.abstract
    step_s = timing["median_s"]
    flop_count = flops.dit_train_flops(cfg, abstract.params, abstract.frozen)

    # ---- the peak, after the step so both see the same machine state
    common.log(f"[throughput] matmul peak ({args.matmul_n}^2)")
    compute_dtype = str(cfg.model.get("matmul_dtype", cfg.model.dtype))
    peaks = {"float32": common.matmul_peak(args.matmul_n, "float32")}
    if compute_dtype != "float32":
        peaks[compute_dtype] = common.matmul_peak(args.matmul_n, compute_dtype)
    peak = peaks[compute_dtype]["flops_per_sec"]
    achieved = flop_count["flops_per_step"] / step_s

    common.emit({
        "benchmark": "throughput", "config": os.path.relpath(args.config, common.ROOT), "overrides": overrides,
        "tiny": args.tiny, "machine": common.machine(), "mesh": dict(mesh.shape),
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "text_len": cfg.text_len,
        "model": {k: cfg.model[k] for k in ("width", "depth", "heads", "attn_impl", "remat_policy", "dtype",
                                            "matmul_dtype", "text_encoder", "text_cache") if k in cfg.model},
        "params": train._param_count(abstract),
        "real_tokens_per_sec": real_per_step / step_s, "padded_tokens_per_sec": slots_per_step / step_s,
        "packing_efficiency": real_per_step / slots_per_step,
        "step_time_s": step_s, "step_time": timing, "compile_s": step.compile_s,
        "flops_per_step": flop_count["flops_per_step"], "flops_per_token": flop_count["flops_per_token"],
        "achieved_flops_per_sec": achieved, "peak_flops_per_sec": peak,
        "peak_source": f"measured {compute_dtype} matmul {args.matmul_n}^2 in this run",
        "mfu": achieved / peak, "matmul_peaks": peaks,
        "memory": step.memory(),
        "loader": loader, "loader_over_step": loader["real_tokens_per_sec"] / (real_per_step / step_s),
    })


if __name__ == "__main__":
    common.reexec_with_huge_pages()
    main()

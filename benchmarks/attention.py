"""Forward+backward time and memory of each attention backend over packed rows of 1k..32k tokens.

    python benchmarks/attention.py [--lengths 1024,2048,...,32768] [--heads 8] [--head_dim 64] [--batch 1]

One JSON line per (backend, length). Rows are packed: segments of mixed lengths (uniform between
length/16 and length/2, a few percent of padding at the end), the same ids for queries and keys, as the
DiT's self-attention sees them. What is timed: `jax.vjp` of `soraax.attention.attention` and the pullback of
a random cotangent (forward + backward, dq/dk/dv waited for), jitted and compiled ahead of time, one warm-up
call, then calls until `--iters` or `--budget_s` (at least one). A call that alone takes longer than a third
of the budget is reported from its single (warm-up) run, `"warmup": 0`.

Memory is XLA's analysis of that compiled program: temp bytes (what the backend allocates beyond its
inputs and outputs). Before running `xla`, which materialises [B, H, S, S] float32 logits (and their
probabilities and gradients), its need is checked against the memory available (the device's, or the
host's free RAM on CPU): the estimate (3 such arrays) and the compiled temp bytes; a length where either
exceeds `--memory_fraction` of it is reported as skipped with both numbers instead of run.
splash (TPU Pallas) and cudnn (NVIDIA) run only on their platform; elsewhere they are reported
"unavailable on <platform>" (splash's Pallas interpreter on CPU checks numbers, it does not benchmark).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}
FULL = {"lengths": ",".join(str(2 ** i) for i in range(10, 16)), "heads": 8, "head_dim": 64, "block": 512,
        "iters": 5, "budget_s": 60.0}
TINY = {"lengths": "128,256", "heads": 2, "head_dim": 16, "block": 64, "iters": 2, "budget_s": 5.0}


def packed_segment_ids(batch: int, length: int, rng):
    """int32 [batch, length]: consecutive segments of mixed lengths, ~3% padding (id 0) at the end."""
    import numpy as np
    ids = np.zeros((batch, length), np.int32)
    real = length - max(1, length // 32)
    for b in range(batch):
        start, seg = 0, 1
        while start < real:
            n = int(rng.integers(max(1, length // 16), max(2, length // 2) + 1))
            ids[b, start:min(real, start + n)] = seg
            start, seg = start + n, seg + 1
    return ids


def fwd_bwd(impl: str, block: int):
    import jax
    from soraax.attention import attention

    def run(q, k, v, ids, dout):
        out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, ids, ids, impl=impl, block_q=block,
                                                          block_kv=block), q, k, v)
        return pullback(dout)
    return jax.jit(run)


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0], config=False)
    p.add_argument("--impls", default="xla,chunked,splash,cudnn", help="backends, comma-separated")
    p.add_argument("--lengths", help=f"sequence lengths, comma-separated (default {FULL['lengths']}; "
                   f"--tiny: {TINY['lengths']})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help=f"default {FULL['heads']} (--tiny: {TINY['heads']})")
    p.add_argument("--head_dim", type=int, help=f"default {FULL['head_dim']} (--tiny: {TINY['head_dim']})")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--block", type=int, help=f"chunked/splash block length (default {FULL['block']}; "
                   f"--tiny: {TINY['block']})")
    p.add_argument("--iters", type=int, help=f"timed calls at most (default {FULL['iters']})")
    p.add_argument("--budget_s", type=float,
                   help=f"seconds of timed calls per measurement at most (default {FULL['budget_s']})")
    p.add_argument("--memory_fraction", type=float, default=0.8,
                   help="skip xla where its need exceeds this share of the available memory")
    args, _ = common.parse(p, argv)  # no config: these flags are the whole setup
    for key, value in (TINY if args.tiny else FULL).items():  # flags given explicitly win over --tiny
        if getattr(args, key) is None:
            setattr(args, key, value)

    import jax
    import jax.numpy as jnp
    import numpy as np

    common.use_compilation_cache()
    platform = jax.devices()[0].platform
    machine = common.machine()
    rng = np.random.default_rng(0)
    lengths = [int(s) for s in args.lengths.split(",")]
    for length in lengths:
        b, h, d = args.batch, args.heads, args.head_dim
        keys = jax.random.split(jax.random.PRNGKey(length), 4)
        q, k, v, dout = (jax.random.normal(key, (b, length, h, d), jnp.float32).astype(args.dtype) for key in keys)
        ids = jnp.asarray(packed_segment_ids(b, length, rng))
        segments = int(np.mean([len(np.unique(r[r > 0])) for r in np.asarray(ids)]))
        for impl in args.impls.split(","):
            record = {"benchmark": "attention", "impl": impl, "seq_len": length, "batch": b, "heads": h,
                      "head_dim": d, "dtype": args.dtype, "segments_per_row": segments, "tiny": args.tiny,
                      "platform": platform, "machine": machine}
            if impl in PLATFORMS and platform not in PLATFORMS[impl]:
                common.emit({**record, "status": f"unavailable on {platform}"})
                continue
            fn = fwd_bwd(impl, args.block)
            start = time.perf_counter()
            try:
                compiled = fn.lower(q, k, v, ids, dout).compile()
            except Exception as error:  # e.g. a backend this jax build lacks: say so, go on
                common.emit({**record, "status": f"compile failed: {type(error).__name__}: {str(error)[:300]}"})
                continue
            record["compile_s"] = time.perf_counter() - start
            memory = common.compiled_memory(compiled)
            record["temp_bytes"] = memory.get("temp")
            record["memory"] = memory
            available = common.available_bytes()
            if impl == "xla":
                logits = 4 * b * h * length * length
                record["xla_logits_bytes"] = logits
                need = max(3 * logits, memory.get("temp") or 0)
                if need > args.memory_fraction * available:
                    common.emit({**record, "status": "skipped: exceeds memory",
                                 "note": f"xla materialises [B,H,S,S] float32 logits: {logits / 2**30:.1f} GiB each, "
                                         f"~{need / 2**30:.1f} GiB with probabilities and gradients (compiled temp "
                                         f"{(memory.get('temp') or 0) / 2**30:.1f} GiB); {available / 2**30:.1f} GiB "
                                         f"available", "available_bytes": available})
                    continue
            common.log(f"[attention] {impl} at {length}: running")

            def call(_):
                jax.block_until_ready(compiled(q, k, v, ids, dout))
            start = time.perf_counter()
            call(0)
            first = time.perf_counter() - start
            if first > args.budget_s / 3:
                timing, warmup = common.summarise([first]), 0
            else:
                timing, warmup = common.time_calls(call, warmup=0, iters=args.iters, budget_s=args.budget_s), 1
            record.update(status="ok", warmup=warmup, time=timing, fwd_bwd_s=timing["median_s"],
                          tokens_per_sec=b * length / timing["median_s"],
                          process_max_rss_bytes=common.max_rss_bytes())
            common.emit(record)


if __name__ == "__main__":
    common.reexec_with_huge_pages()
    main()

"""The PyTorch half of benchmarks/peer.py: diffusers' DiTTransformer2DModel train steps on CPU torch.

Run by peer.py with a Python that has torch and diffusers (soraax's own environment stays torch-free):

    /path/to/torch/python benchmarks/peer_torch.py --jobs '[{"name": "S", "width": 384, "depth": 12,
        "heads": 6, "batch": 8, "side": 16}]' [--steps 10] [--warmup 2] [--threads N]

Imports neither soraax nor JAX. A job is one model and input shape: `side` x `side` patches of 2x2 latent
pixels, 4 latent channels (DiTTransformer2DModel unpatchifies square grids only). One step is what soraax's
step does: rectified-flow loss (x_t = (1 - t) x0 + t eps, target eps - x0, t uniform per sample) through
the class-conditional DiT (adaLN-Zero; labels random), backward, gradient clipping at 1.0, AdamW, and an EMA
of the params (torch._foreach_lerp_). A job with `"autocast": "bfloat16"` runs the forward and loss under
`torch.autocast("cpu", torch.bfloat16)` (PyTorch's mixed precision: matmuls and attention in bfloat16 on
oneDNN, params, norms and the optimizer in float32), the peer of soraax's `model.matmul_dtype=bfloat16`.
Timed step by step after `--warmup` untimed steps (CPU torch runs
synchronously, so the clock sees the whole step). FLOPs are torch's FlopCounterMode over one
forward + backward. One JSON line per job on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def run_job(job: dict, steps: int, warmup: int) -> dict:
    import torch
    from diffusers import DiTTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    width, heads, side, batch = job["width"], job["heads"], job["side"], job["batch"]
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
                                  out_channels=4, num_layers=job["depth"], sample_size=2 * side, patch_size=2,
                                  norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    x0 = torch.randn(batch, 4, 2 * side, 2 * side)
    autocast = job.get("autocast")
    seen = {}
    if autocast not in (None, "bfloat16"):
        raise SystemExit(f"peer_torch: job {job['name']}: autocast must be null or 'bfloat16', got {autocast!r}")

    def loss_fn():
        t = torch.rand(batch)
        eps = torch.randn_like(x0)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        mixed = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with mixed:
            out = model(x_t, timestep=(t * 999).long(), class_labels=torch.randint(0, 1000, (batch,))).sample
        seen["output_dtype"] = str(out.dtype).replace("torch.", "")  # autocast really ran: bfloat16
        return torch.nn.functional.mse_loss(out.float(), eps - x0)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.995)
        return float(loss.detach())

    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    opt.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    tokens = batch * side * side
    return {**job, "framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in params), "tokens_per_step": tokens, "tokens_per_sec": tokens / median,
            "step_time_s": median, "step_time": {"median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                                                 "spread": (max(seconds) - min(seconds)) / median, "n": len(seconds)},
            "flops_per_step": flops, "flops_per_token": flops / tokens, "achieved_flops_per_sec": flops / median,
            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **seen}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--jobs", required=True, help="JSON list of {name, width, depth, heads, batch, side[, autocast]}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per job")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    for job in json.loads(args.jobs):
        log(f"[peer_torch] {job['name']}: {job['batch']} x {job['side']}^2 tokens, {torch.get_num_threads()} threads"
            + (f", autocast {job['autocast']}" if job.get("autocast") else ""))
        print(json.dumps(run_job(job, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()

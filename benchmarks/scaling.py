"""Weak scaling of the train step over 1, 2, 4, 8 CPU devices, and DiT-XL's compile-only numbers on TPU slices.

    python benchmarks/scaling.py --config configs/tiny.py [--devices 1,2,4,8] [--per_device_batch 2]
        [--topologies v5p-64,v6e-64] [--topology_config configs/dit_xl.py] [--config.KEY=VALUE ...]

Weak scaling: each device count runs in its own subprocess (the CPU device count is fixed when JAX starts:
XLA_FLAGS=--xla_force_host_platform_device_count=N), with mesh data=N and batch_size = per_device_batch x N
packed rows, so every device always has the same work. Rows come from soraax's packer over the native-aspect
clip mix (random contents: the step's cost depends on shapes). The step is the real sharded step, compiled
ahead of time, `--warmup` untimed, `--steps` timed (median). One JSON line per device count, then a summary
line: tokens/sec, and the efficiency tokens/sec(N) / (N x tokens/sec(1)). Host devices share the
machine's cores (`host_cpus` in the output): on a machine with fewer cores than devices, the efficiency
measures the partitioned program's overhead, not a speed-up.

Compile-only: `soraax.topology.compile_report` (what `python -m soraax.train --compile_only --topology T`
prints) for `--topology_config` on each of `--topologies`: per-chip memory, the HBM verdict, FLOPs and
XLA's cost model. Needs libtpu (pip install 'soraax[tpu]'); without it each line says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _worker(args, overrides) -> None:
    """One device count, in this process (its XLA_FLAGS set by the parent)."""
    import jax
    import numpy as np
    from soraax import train

    n = jax.device_count()
    cfg = common.load_config(args.config, {**overrides, "mesh.data": str(n), "mesh.fsdp": "1",
                                           "mesh.context": "1", "mesh.tensor": "1",
                                           "batch_size": str(args.per_device_batch * n),
                                           # unused here, but validated: its rows must split over the mesh too
                                           "vae.batch_size": str(n)}, tiny=args.tiny)
    from soraax import patches
    patch_dim = patches.patch_dim(tuple(cfg.model.patch_size), cfg.vae.latent_channels)
    rng = np.random.default_rng(0)
    clips, batches = [], []
    text_width = None
    if train.caches_text(cfg):
        from soraax.models import build
        text_width = build(cfg).text.width
    lengths = common.caption_lengths(cfg, 16 * cfg.batch_size * cfg.max_segments)
    for shape, caption in zip(common.native_shapes(cfg, len(lengths)), lengths):
        clips.append(common.fake_clip(common.patch_grid(cfg, shape), patch_dim, caption, rng, text_width))
    batches = common.pack(cfg, clips)[:max(1, min(args.steps, 4))]
    step = common.TrainStep(cfg, train.dit_task(cfg), batches[0])
    timing = step.time(batches, warmup=args.warmup, steps=args.steps)
    real = float(np.mean([(b["segment_ids"] > 0).sum() for b in batches]))
    common.emit({"devices": n, "batch_size": cfg.batch_size, "real_tokens_per_step": real,
                 "real_tokens_per_sec": real / timing["median_s"],
                 "padded_tokens_per_sec": cfg.batch_size * cfg.seq_len / timing["median_s"],
                 "step_time_s": timing["median_s"], "step_time": timing, "compile_s": step.compile_s,
                 "memory": step.memory()})


def _topology(args) -> list[dict]:
    records = []
    names = [t for t in args.topologies.split(",") if t]
    if not names:
        return records
    if importlib.util.find_spec("libtpu") is None:
        return [{"benchmark": "scaling", "topology": t, "skipped": "libtpu is not installed (pip install "
                 "'soraax[tpu]'); compiling for a TPU slice from this machine needs it"} for t in names]
    from soraax import config as config_lib, topology, train
    cfg = common.load_config(args.topology_config, {}, validate=False)
    if args.tiny:  # the tiny model on a 4-chip slice: checks the path in seconds
        cfg = common.load_config(args.config, {"mesh.data": "1", "mesh.fsdp": "-1", "batch_size": "4"},
                                 tiny=True, validate=False)
    for name in names:
        common.log(f"[scaling] compiling {os.path.relpath(args.topology_config if not args.tiny else args.config)} "
                   f"for {name} (compile only)")
        try:
            report = topology.compile_report(cfg, name, train.lower_step)
        except (config_lib.ConfigError, topology.TopologyError) as error:
            report = {"topology": name, "skipped": str(error)}
        records.append({"benchmark": "scaling", "config": os.path.relpath(
            args.config if args.tiny else args.topology_config, common.ROOT), "tiny": args.tiny, **report})
    return records


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--devices", help="CPU device counts, comma-separated (default 1,2,4,8; --tiny: 1,2)")
    p.add_argument("--per_device_batch", type=int, default=2, help="packed rows per device")
    p.add_argument("--steps", type=int, default=10, help="timed steps per device count")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument("--topologies", help="TPU slices to compile DiT-XL for, comma-separated, '' for none "
                   "(default v5p-64,v6e-64; --tiny: v5e-4 with the tiny model)")
    p.add_argument("--topology_config", default=os.path.relpath(os.path.join(common.ROOT, "configs", "dit_xl.py")),
                   help="the config compiled for the slices")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = common.parse(p, argv)
    if args.tiny:
        args.steps, args.warmup, args.per_device_batch = min(args.steps, 2), min(args.warmup, 1), 1
    args.devices = args.devices or ("1,2" if args.tiny else "1,2,4,8")
    args.topologies = ("v5e-4" if args.tiny else "v5p-64,v6e-64") if args.topologies is None else args.topologies
    if args.worker:
        common.use_compilation_cache()
        return _worker(args, overrides)

    counts = [int(n) for n in args.devices.split(",")]
    results = []
    for n in counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip())
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config,
               "--per_device_batch", str(args.per_device_batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
        cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
        common.log(f"[scaling] {n} device(s): {args.per_device_batch * n} rows")
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"scaling: the {n}-device run failed (exit {done.returncode}); its stderr is above")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(record)
    machine = common.machine()  # this process's backend times nothing: only the host is described
    base = results[0]["real_tokens_per_sec"] / results[0]["devices"]
    for record in results:
        record["weak_scaling_efficiency"] = record["real_tokens_per_sec"] / (record["devices"] * base)
        common.emit({"benchmark": "scaling", "config": os.path.relpath(args.config, common.ROOT),
                     "overrides": overrides, "tiny": args.tiny, "per_device_batch": args.per_device_batch,
                     "machine": {**machine, "devices": record["devices"]}, **record})
    common.emit({"benchmark": "scaling", "summary": True, "tiny": args.tiny, "host_cpus": machine["host_cpus"],
                 "devices": [r["devices"] for r in results],
                 "real_tokens_per_sec": [r["real_tokens_per_sec"] for r in results],
                 "weak_scaling_efficiency": [r["weak_scaling_efficiency"] for r in results]})
    for record in _topology(args):
        common.emit(record)


if __name__ == "__main__":
    common.reexec_with_huge_pages()
    main()

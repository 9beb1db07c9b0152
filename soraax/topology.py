"""Compile the real train step for a TPU slice from a CPU machine: does a config shard, and fit in HBM?

`python -m soraax.train --config configs/dit_xl.py --compile_only --topology v5p-64` builds the slice's
devices with libtpu (`jax.experimental.topologies.get_topology_desc`, compile-only: nothing runs and
no TPU is needed), resolves `config.mesh` against them, lowers and compiles the same jitted, sharded step
`train.py` runs, and reports what XLA's TPU compiler says it needs per chip.

Slice names are Google Cloud accelerator types, and their number does not always count chips:
  v4-N, v5p-N                N counts TensorCores, two a chip: v5p-64 is 32 chips (2x4x4). JAX runs the
                             two cores of a chip as one "megacore" device, so v5p-64 gives 32 devices.
  v5e-N (v5litepod-N), v6e-N N counts chips, one TensorCore each: v6e-64 is 64 chips (8x8).

Sizes are bytes unless a name ends in `_gib` (GiB, 1024**3 bytes), always per chip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

import jax
import numpy as np

from soraax import config as config_lib, flops, sharding

GIB = 1024 ** 3


def _gib(n: float) -> float:
    return round(n / GIB, 6)  # 1 KiB resolution: small test models still show their sizes


class TopologyError(ValueError):
    """A topology name that is not a TPU slice, or a slice that cannot be built here; one line."""


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str                 # what users type before the "-N"
    libtpu_name: str          # what libtpu's topology parser wants before ":AxBxC"
    cores_per_count: int      # TensorCores the "-N" counts per chip: 2 when N counts cores, 1 when chips
    hbm_gib: float            # HBM per chip (a megacore device owns the whole chip's HBM)
    peak_bf16_tflops: float   # per chip, dense bf16
    chip_config: str          # libtpu chip config: "megacore" fuses the chip's two cores into one device
    shapes: dict[int, tuple[int, ...]]   # chips -> physical slice shape, as Google Cloud provisions them


# Slice shapes from the Cloud TPU docs' topology tables (cloud.google.com/tpu/docs/v4, v5p, v5e, v6e).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}

# HBM and peak bf16 per chip from the same docs: v4 32 GiB / 275 TFLOPs, v5p 95 GiB / 459, v5e 16 GiB /
# 197, v6e 32 GiB / 918. XLA keeps a little for itself: it reports 15.75 GiB usable on a v5e chip.
GENERATIONS = {
    "v4": Generation("v4", "v4", 2, 32.0, 275.0, "megacore", _SHAPES_3D),
    "v5p": Generation("v5p", "v5p", 2, 95.0, 459.0, "megacore", {**_SHAPES_3D, 6144: (16, 16, 24)}),
    "v5e": Generation("v5e", "v5e", 1, 16.0, 197.0, "default", _SHAPES_2D),
    "v6e": Generation("v6e", "v6e", 1, 32.0, 918.0, "default", _SHAPES_2D),
}
_ALIASES = {"v5litepod": "v5e"}

# Single-host slices are one VM with all their chips; bigger ones are split over hosts of this many.
_SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str                 # as typed, e.g. "v5p-64"
    generation: Generation
    chips: int
    shape: tuple[int, ...]    # physical chip grid

    @property
    def libtpu_topology(self) -> str:
        return f"{self.generation.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return int(self.generation.hbm_gib * GIB)


def valid_forms() -> str:
    """One line naming every slice this module knows."""
    parts = []
    for g in GENERATIONS.values():
        counts = ", ".join(str(c * g.cores_per_count) for c in sorted(g.shapes))
        unit = "TensorCores, 2 a chip" if g.cores_per_count == 2 else "chips"
        parts.append(f"{g.name}-N with N in {{{counts}}} ({unit})")
    return "; ".join(parts) + "; v5litepod-N = v5e-N"


def parse(name: str) -> Slice:
    """'v5p-64' -> Slice(v5p, 32 chips, (2, 4, 4)); raises TopologyError naming the valid forms."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    generation = GENERATIONS.get(_ALIASES.get(match.group(1), match.group(1))) if match else None
    if generation is None:
        raise TopologyError(f"--topology {name!r} is not a TPU slice name; valid forms: {valid_forms()}")
    count = int(match.group(2))
    chips, remainder = divmod(count, generation.cores_per_count)
    if remainder or chips not in generation.shapes:
        raise TopologyError(f"--topology {name!r}: {generation.name} has no slice of {count}; "
                            f"valid forms: {valid_forms()}")
    return Slice(name, generation, chips, generation.shapes[chips])


def hbm_verdict(total_bytes: float, hbm_bytes: float) -> str:
    """The one-line answer to "does it fit?" for a compile that succeeded."""
    share = total_bytes / hbm_bytes
    if total_bytes <= hbm_bytes:
        return f"fits: {total_bytes / GIB:.2f} GiB of {hbm_bytes / GIB:.2f} GiB HBM per chip ({share:.0%})"
    return f"does not fit: needs {total_bytes / GIB:.2f} GiB of {hbm_bytes / GIB:.2f} GiB HBM per chip"


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": GIB, "t": 1024 ** 4}
# XLA:TPU's out-of-memory messages: "Ran out of memory on HBM, the total memory required for HLO temporaries
# (22.14G) exceeds available HBM (15.75G)" (libtpu 0.0.42) and "Ran out of memory in memory space hbm. Used
# 21.95G of 15.48G hbm" (older libtpu). The first number is what the program needs, the second what XLA can
# use of the chip's HBM. Out of memory in other spaces (vmem) is a compiler problem, not a fit: it re-raises.
_OOM_PATTERNS = (
    re.compile(r"required for [^(]*\(([\d.]+)\s*([kmgt]?)i?b?\)\s*exceeds available hbm \(([\d.]+)\s*([kmgt]?)i?b?\)"),
    re.compile(r"used ([\d.]+)\s*([kmgt]?)i?b? of ([\d.]+)\s*([kmgt]?)i?b? hbm"),
)


def parse_oom(message: str) -> tuple[float, float] | None:
    """(bytes needed, bytes XLA can use) from an XLA:TPU out-of-memory message; None for other errors."""
    text = message.lower()
    if "resource_exhausted" not in text and "out of memory" not in text:
        return None
    for pattern in _OOM_PATTERNS:
        found = pattern.search(text)
        if found:
            need, need_unit, have, have_unit = found.groups()
            return float(need) * _UNITS[need_unit], float(have) * _UNITS[have_unit]
    return None


def oom_verdict(needed_bytes: float, usable_bytes: float, hbm_bytes: float) -> str:
    return (f"does not fit: needs {needed_bytes / GIB:.2f} GiB of {usable_bytes / GIB:.2f} GiB "
            f"(XLA's usable share of the {hbm_bytes / GIB:.0f} GiB HBM per chip)")


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (its shards only)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def slice_devices(slice_: Slice) -> list:
    """The slice's compile-only devices from libtpu (one per chip)."""
    try:
        from jax.experimental import topologies
        # Only to quiet libtpu, which otherwise probes for a TPU VM's metadata and warns that it found none;
        # read once, when libtpu starts. The slice built is the one named below.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        kwargs = {"chip_config_name": slice_.generation.chip_config}
        if slice_.chips <= _SINGLE_HOST_MAX_CHIPS[slice_.generation.name]:
            kwargs["chips_per_host_bounds"] = (*slice_.shape, 1)[:3]
        devices = topologies.get_topology_desc(slice_.libtpu_topology, "tpu", **kwargs).devices
    except RuntimeError as error:  # jax raises RuntimeError when libtpu is not installed
        if "TPU support not installed" in str(error) or "libtpu" in str(error).lower():
            raise TopologyError(f"--topology needs libtpu to compile for TPU on this machine: "
                                f"pip install 'soraax[tpu]' ({error})") from error
        raise
    if len(devices) != slice_.chips:
        raise TopologyError(f"libtpu built {len(devices)} devices for {slice_.libtpu_topology}, "
                            f"expected one per chip ({slice_.chips})")
    return list(devices)


def _check_batch_splits(cfg, mesh) -> None:
    rows = cfg.batch_size if cfg.task == "dit" else cfg.vae.batch_size
    splits = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % splits:
        key = "batch_size" if cfg.task == "dit" else "vae.batch_size"
        raise config_lib.ConfigError(f"config.{key}={rows} rows do not split over data x fsdp = {splits} "
                                     f"devices of mesh {dict(mesh.shape)}; use a multiple of {splits}")


def _state_gib(state) -> dict[str, float]:
    """What one device holds of the train state, from its shapes and shardings (exact, before compiling)."""
    return {"params": _gib(per_device_bytes(state.params)), "ema_params": _gib(per_device_bytes(state.ema_params)),
            "optimizer_state": _gib(per_device_bytes(state.opt_state)),
            "frozen_text_encoder": _gib(per_device_bytes(state.frozen))}


def _compiled_gib(memory) -> dict[str, float]:
    """Per-device memory from XLA's analysis of the compiled step."""
    xla = {"arguments": memory.argument_size_in_bytes,
           # XLA's temp allocation: activations kept for the backward pass, gradients, the optimizer's
           # intermediates, collectives' buffers. Not a peak: on TPU it comes out above `total`.
           "temporaries": memory.temp_size_in_bytes,
           "generated_code": memory.generated_code_size_in_bytes}
    return {k: _gib(v) for k, v in {**xla, "total": peak_bytes(memory)}.items()}


def peak_bytes(memory) -> int:
    """What must fit in one chip's HBM: XLA's peak of live bytes over the compiled step where it reports
    one (it knows which buffers are live together and which inputs the outputs reuse), else the sum."""
    return getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)


def _xla_cost(cost: dict | list | None) -> tuple[float | None, float | None]:
    """(XLA's FLOPs per device, XLA's cost-model seconds or None when it gives no positive estimate)."""
    if isinstance(cost, list):  # older jax returns one dict per program
        cost = cost[0] if cost else None
    if not cost:
        return None, None
    seconds = cost.get("optimal_seconds")
    return cost.get("flops"), seconds if seconds is not None and seconds > 0 else None


@contextlib.contextmanager
def _not_cached():
    """Keeps the compile out of the persistent compilation cache: a compile-only executable cannot be
    loaded back without a TPU, so a cached one only makes the next run warn and compile again."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


def compile_report(cfg, topology_name: str,
                   lower_step: Callable[[Any, jax.sharding.Mesh], tuple[Any, Any, int]]) -> dict:
    """Compiles the train step for `topology_name` and reports per-chip memory, the HBM verdict and FLOPs.

    `lower_step(cfg, mesh) -> (lowered, abstract state, tokens per step)` is `train.lower_step` (passed in
    rather than imported, because `python -m soraax.train` runs train.py as `__main__`). An out-of-memory
    compile is a verdict in the report, not an exception.
    """
    config_lib.validate(cfg)
    slice_ = parse(topology_name)
    devices = slice_devices(slice_)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as error:  # its message names config.mesh; say which slice it was resolved against
        raise config_lib.ConfigError(f"{error} (on {slice_.name}: {slice_.chips} chips)") from error
    _check_batch_splits(cfg, mesh)
    g = slice_.generation
    report: dict[str, Any] = {
        "topology": slice_.name, "libtpu_topology": slice_.libtpu_topology, "chips": slice_.chips,
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "hbm_per_chip_gib": g.hbm_gib}
    start = time.perf_counter()
    lowered, state, tokens = lower_step(cfg, mesh)
    report["tokens_per_step"] = tokens
    report["params"] = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
    try:
        with _not_cached():
            compiled = lowered.compile()
    except Exception as error:  # XLA raises JaxRuntimeError (RESOURCE_EXHAUSTED) when the step cannot fit
        oom = parse_oom(str(error))
        if oom is None:
            raise
        report.update(compile_seconds=round(time.perf_counter() - start, 1), fits=False,
                      verdict=oom_verdict(*oom, slice_.hbm_bytes),
                      memory_gib={**_state_gib(state), "total_needed": _gib(oom[0]), "usable": _gib(oom[1])})
        return report
    report["compile_seconds"] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    peak = peak_bytes(memory)
    report.update(fits=peak <= slice_.hbm_bytes, verdict=hbm_verdict(peak, slice_.hbm_bytes),
                  memory_gib={**_state_gib(state), **_compiled_gib(memory)})
    xla_flops, cost_seconds = _xla_cost(compiled.cost_analysis())
    flop_report: dict[str, Any] = {"xla_per_device": xla_flops}
    if cfg.task == "dit":
        analytic = flops.dit_train_flops(cfg, state.params, state.frozen)["flops_per_step"]
        flop_report["analytic_per_device"] = analytic / slice_.chips
        # The time the analytic FLOPs take at the chip's peak: a lower bound on the step (MFU = 100%).
        flop_report["step_seconds_at_peak"] = analytic / (slice_.chips * g.peak_bf16_tflops * 1e12)
    if cfg.task == "dit" and (cfg.model.scan_layers or cfg.model.attn_impl == "chunked"):
        flop_report["note"] = ("XLA counts a loop's body once: the scanned layer stack (forward and backward) "
                               "and chunked attention's block loops, so xla_per_device and the cost model fall "
                               "far short; analytic_per_device (soraax/flops.py) is the model's matmuls")
    report["flops"] = flop_report
    # XLA's own time estimate for the step, from the same loop-once counts (v6e's libtpu gives none).
    report["xla_cost_model_seconds"] = cost_seconds
    return report

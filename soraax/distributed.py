"""Multi-host start-up: join this process to its peers with `jax.distributed.initialize`, or do nothing.

Every process of a multi-host run calls `initialize()` before anything touches a device. Where the
settings come from, first found wins for each of the three:

    arguments           train's --coordinator_address, --num_processes, --process_id
    SORAAX_* variables  SORAAX_COORDINATOR_ADDRESS, SORAAX_NUM_PROCESSES, SORAAX_PROCESS_ID (launch/local.py)
    JAX's own variable  JAX_COORDINATOR_ADDRESS (JAX itself also reads JAX_LOCAL_DEVICE_IDS,
                        JAX_COORDINATOR_PORT and JAX_COORDINATOR_BIND_ADDRESS)

All three given: exactly those are used, and JAX's cluster auto-detection is switched off, so a process
sees all its local devices unless `local_device_ids` (or JAX_LOCAL_DEVICE_IDS) narrows them. None given:
on a cluster JAX knows how to read - a Cloud TPU VM (TPU chips on the PCI bus: one host or a pod) or a
SLURM job step of several tasks - `jax.distributed.initialize()` detects everything itself (under SLURM
that means one process per GPU); anywhere else the run is a single process and nothing is called, so a
laptop run never waits on peers that will not come. Some but not all given off a cluster is an error that
names what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import traceback
from typing import Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# (flag, then environment variables in the order they are read) for each setting.
SOURCES = {
    "coordinator_address": ("--coordinator_address", "SORAAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("--num_processes", "SORAAX_NUM_PROCESSES"),
    "process_id": ("--process_id", "SORAAX_PROCESS_ID"),
}


class DistributedConfigError(ValueError):
    """The multi-host settings cannot work; the message names the flag or environment variable."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `initialize` did: which process this is, of how many, and where the settings came from."""
    process_index: int
    process_count: int
    how: str
    coordinator_address: str | None = None

    def __str__(self) -> str:
        if self.process_count == 1 and self.coordinator_address is None:
            return f"single process ({self.how})"
        return (f"process {self.process_index} of {self.process_count}, coordinator "
                f"{self.coordinator_address or 'auto-detected'} ({self.how})")


@dataclasses.dataclass(frozen=True)
class Setting:
    value: str | int | None
    source: str | None  # the flag or variable it came from


def read_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Setting]:
    """Each setting from its argument, else the first of its environment variables that is set and
    not empty; the integers parsed, with errors that name where a bad value came from."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    settings = {}
    for name, (flag, *variables) in SOURCES.items():
        value, source = given[name], flag
        if value is None:
            value, source = next(((environ[v], v) for v in variables if environ.get(v, "").strip()), (None, None))
        if value is not None and name != "coordinator_address":
            value = _parse_int(value, source)
        settings[name] = Setting(value, source)
    return settings


def _parse_int(value, source: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedConfigError(f"{source}={value!r} is not an integer") from None


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """"tpu" or "slurm" where `jax.distributed.initialize()` can find its peers alone; None elsewhere.

    Cheap local checks only (no network), so a plain machine answers at once.
    """
    environ = os.environ if environ is None else environ
    # Inside an `srun` step of several tasks; the batch script itself (one process) is not a cluster run.
    if "SLURM_STEP_ID" in environ and _int_or_zero(environ.get("SLURM_STEP_NUM_TASKS")) > 1:
        return "slurm"
    if _tpu_chips() > 0:
        return "tpu"
    return None


def _int_or_zero(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _tpu_chips() -> int:
    # JAX's own test for a Cloud TPU VM (PCI vendor and device ids of TPU chips), kept current by JAX.
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def _check(settings: dict[str, Setting]) -> None:
    address, count, index = (settings[k] for k in ("coordinator_address", "num_processes", "process_id"))
    if count.value is not None and count.value < 1:
        raise DistributedConfigError(f"{count.source}={count.value}: the number of processes must be >= 1")
    if index.value is not None and index.value < 0:
        raise DistributedConfigError(f"{index.source}={index.value}: a process id must be >= 0")
    if count.value is not None and index.value is not None and index.value >= count.value:
        raise DistributedConfigError(f"{index.source}={index.value} is out of range for {count.source}="
                                     f"{count.value}: process ids run 0..{count.value - 1}")
    if address.value is not None:
        host, _, port = str(address.value).rpartition(":")
        if not host or not port.isdigit():
            raise DistributedConfigError(f"{address.source}={address.value!r} must be HOST:PORT, "
                                         f"e.g. 10.0.0.1:8476 (process 0's address)")


def _require_all(settings: dict[str, Setting]) -> None:
    given = {k: s for k, s in settings.items() if s.value is not None}
    missing = [k for k in settings if settings[k].value is None]
    if given and missing:
        have = ", ".join(f"{s.source}={s.value}" for s in given.values())
        need = "; ".join(f"{SOURCES[k][0]} (or {' / '.join(SOURCES[k][1:])})" for k in missing)
        raise DistributedConfigError(f"multi-process settings are incomplete: {have} is set but not {need}. "
                                     f"Give all three, or none for a single process")


def _use_gloo_on_cpu() -> None:
    # Cross-process collectives on the CPU backend need an implementation; gloo ships with jaxlib. It is
    # JAX 0.10's default, but older and newer releases have defaulted to none. An explicit "mpi" stays.
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
               environ: Mapping[str, str] | None = None) -> Setup:
    """Joins this process to a multi-host run when the settings (module docstring) or the cluster ask for
    one; a single process otherwise, with nothing called. Call it before anything touches a device."""
    if jax.distributed.is_initialized():  # a caller (a notebook, a launcher) did it already
        return Setup(jax.process_index(), jax.process_count(), "initialized before soraax was asked")
    settings = read_settings(coordinator_address, num_processes, process_id, environ)
    _check(settings)
    values = {k: s.value for k, s in settings.items()}
    complete = None not in values.values()
    cluster = None if complete else detect_cluster(environ)
    if cluster is None:
        _require_all(settings)
        if not complete:
            return Setup(0, 1, "no coordinator given and no cluster detected")
        if values["num_processes"] == 1:
            return Setup(0, 1, f"{settings['num_processes'].source}=1")
    _use_gloo_on_cpu()
    if complete:
        jax.distributed.initialize(**values, local_device_ids=local_device_ids,
                                   cluster_detection_method="deactivate")
        how = "from " + ", ".join(sorted({s.source for s in settings.values()}))
    else:  # JAX fills in whatever is not given from the cluster's environment
        jax.distributed.initialize(**values, local_device_ids=local_device_ids)
        how = f"auto-detected {cluster}"
    return Setup(jax.process_index(), jax.process_count(), how, values["coordinator_address"])


def meet(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `meet(name)`; nothing to wait for in a single process.

    A barrier of the coordination service (Orbax's), not a device collective, so it waits as long as
    `timeout_s`: on CPU a first collective fails when its processes arrive more than 30 s apart (gloo).
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def host_copy(tree):
    """Every leaf as a numpy array of its whole (global) value, on every process.

    For work each host does alone and at its own pace (its share of the input pipeline): a computation
    over arrays that span processes must be launched by every process in the same order. A leaf split
    across processes is gathered, which is a collective: then every process must call this together.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)
    return jax.tree_util.tree_map(one, tree)


@contextlib.contextmanager
def fail_fast(setup: Setup):
    """In a multi-process run, an error ends this process at once, with a non-zero status.

    Without it a failed process would sit in JAX's exit barrier (`jax.distributed.shutdown`, up to five
    minutes) while its peers sit in a collective waiting for it: nothing would exit, and no launcher could
    tell which process failed. A single process raises as usual.
    """
    try:
        yield
    except BaseException as error:
        code = error.code if isinstance(error, SystemExit) else 130 if isinstance(error, KeyboardInterrupt) else 1
        if setup.process_count == 1 or code in (0, None):
            raise
        if not isinstance(error, SystemExit):
            traceback.print_exc()
        elif not isinstance(code, int):  # sys.exit("message"): Python would print it on the way out
            print(code, file=sys.stderr)
        print(f"process {setup.process_index} of {setup.process_count} failed; exiting without waiting "
              f"for the others", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
